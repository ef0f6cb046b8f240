"""The fit's FSDP2 alternatives for a family other than transformer/moe: CPU offload of a traced module under
zero3, its needed bytes equal to the full per-rank estimate of that layout plus the reserve."""

from __future__ import annotations

from pathlib import Path

import pytest

from estimator import load_config
from estimator.fit import alternatives, step_peak
from estimator.hardware import CONTEXT_RESERVE, GPU

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent
STACK = {"module": "tests.fsdp_module_blocks:make_stack", "inputs": [{"shape": [2, 8], "dtype": "int64", "high": 40}],
         "loss": "cross_entropy", "search_dir": str(ROOT)}
OFFLOAD = "--set parallel.offload=true (model states in host memory)"


def _config(model: dict, *extra: str):  # noqa: ANN202
    # sgd in bf16 and a module's own batch: of the fit's alternatives only offload and the world sizes apply
    return load_config(None, ["optimizer.name=sgd", "training.precision=bf16", *extra], base={"model": dict(model)})


def test_offload_is_offered_for_a_traced_module_and_refused_for_the_mlp_family() -> None:
    cfg = _config(STACK)
    plain, _ = step_peak(cfg, "zero3", 2)
    offloaded, ranks = step_peak(_config(STACK, "parallel.offload=true"), "zero3", 2)
    assert offloaded < plain
    gpu = GPU("between", CONTEXT_RESERVE + offloaded, None, 1.0, "a test budget: offload fits, the step does not")
    found = {a.change: a for a in alternatives(cfg, gpu, "zero3", 2)}
    assert OFFLOAD in found
    assert (found[OFFLOAD].needed_bytes, found[OFFLOAD].fits, found[OFFLOAD].worst_ranks) == (
        offloaded + CONTEXT_RESERVE, True, ranks)
    # the mlp family's FSDP2 timeline does not model offload: the alternative is left out, not guessed
    mlp = _config({"family": "mlp", "dim": 64, "num_layers": 3})
    tiny = GPU("tiny", CONTEXT_RESERVE + 1000, None, 1.0, "a test budget")
    assert OFFLOAD not in {a.change for a in alternatives(mlp, tiny, "zero3", 2)}
