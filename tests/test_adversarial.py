"""Adversarial inputs a new user could type, found by fuzzing the CLI: each was a traceback (exit 1), a hang,
or an option silently ignored, and is now one ``error:`` line with exit code 2 (or the right answer)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from estimator.cli import app
from tests.hf.tiny_configs import TINY_CONFIGS
from tests.test_bad_input import fails

runner = CliRunner()


def hf_file(tmp_path: Path, base: str, **changes: object) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_CONFIGS[base], **changes}))
    return str(path)


@pytest.mark.parametrize("value", [[], {}, 3])
def test_hf_model_type_not_a_string(tmp_path: Path, value: object) -> None:
    """Was ``internal error: TypeError: unhashable type: 'list'``."""
    fails(["estimate", "-m", hf_file(tmp_path, "gpt2", model_type=value)],
          f"key 'model_type' must be a string, got {value!r}")


@pytest.mark.parametrize("override", ["model.num_layers=1000000000", "model.num_layers=100001"])
def test_moe_layers_bounded_at_once(override: str) -> None:
    """MoE validation listed every layer (``range(num_layers)``) before the bound: 10^9 layers hung."""
    start = time.perf_counter()
    fails(["estimate", "-m", "mixtral-8x7b", "--set", override],
          "model.num_layers: input should be less than or equal to 100000")
    assert time.perf_counter() - start < 5


def test_hf_moe_layers_bounded(tmp_path: Path) -> None:
    fails(["estimate", "-m", hf_file(tmp_path, "mixtral", num_hidden_layers=10**30)], "model.num_layers:")


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.num_experts=1025"], "model.num_experts: at most 1,024 routed experts, got 1,025"),
    (["model.num_experts=1024", "model.num_layers=1000"],
     "model.num_experts: at most 1,000,000 experts x layers in all, got 1,024 x 1,000"),
])
def test_moe_experts_bounded(overrides: list[str], expected: str) -> None:
    """4,096 experts (eager) did not finish in 60 s; 10^30 was an OverflowError (exit 1)."""
    fails(["estimate", "-m", "mixtral-8x7b", *[a for o in overrides for a in ("--set", o)]], expected)


def test_hf_moe_experts_bounded(tmp_path: Path) -> None:
    fails(["estimate", "-m", hf_file(tmp_path, "mixtral", num_local_experts=10**30)],
          "model.num_experts: at most 1,024 routed experts")


@pytest.mark.parametrize(("args", "expected"), [
    (["--sp"], "parallel.sequence_parallel: applies with tensor parallelism (--parallel tp, or --tp N)"),
    (["-s", "parallel.loss_parallel=true", "--parallel", "fsdp"], "parallel.loss_parallel: applies with tensor"),
    (["-s", "parallel.world_size=4"], "parallel.world_size: 4 applies with a parallel.strategy"),
    (["-s", "parallel.tp_size=4"], "parallel.tp_size: 4 applies with --parallel tp, fsdp or zero3, not one device"),
    (["-s", "parallel.reshard_after_forward=false", "--parallel", "zero3"],
     "parallel.reshard_after_forward: false applies with --parallel fsdp (zero3 always reshards)"),
    (["-s", "parallel.reduce_dtype=param", "--parallel", "fsdp"],
     "parallel.reduce_dtype: applies with --parallel zero3 or fsdp and training.master_weights: true"),
    (["-s", "parallel.fsdp_unit_class=Block", "--parallel", "ddp"],
     "parallel.fsdp_unit_class: applies with --parallel zero3 or fsdp, not --parallel ddp"),
    (["-s", "parallel.sync_every_micro_batch=false"], "parallel.sync_every_micro_batch: false applies with"),
])
def test_parallel_options_that_cannot_apply(args: list[str], expected: str) -> None:
    """Each was silently ignored (the one-device estimate printed as if the option held)."""
    fails(["estimate", "-m", "gpt2", *args], expected)
    fails(["verify", "-m", "gpt2", *args], expected)  # refused before torch builds anything


def test_config_world_size_kept_under_parallel() -> None:
    """``parallel.world_size: 4`` with ``--parallel ddp`` and no -n ran 2 ranks (the -n default)."""
    result = runner.invoke(app, ["estimate", "-m", "gpt2", "-s", "parallel.world_size=4", "--parallel", "ddp",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["distributed"]["world_size"] == 4


def test_hf_config_json_size_bounded(tmp_path: Path) -> None:
    """A 100 MB config.json was parsed whole (1.4 s, 236 MB); over 16 MiB is refused before reading."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_CONFIGS["llama"]))
    with path.open("r+b") as f:  # sparse: no 17 MiB written
        f.truncate(17 << 20)
    fails(["estimate", "-m", str(path)], "larger than 16 MiB (17,825,792 bytes)")


FACTORIES = '''
import sys
import torch


def exits(**kwargs):
    sys.exit(3)


class ExitsInForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 2)

    def forward(self, x):
        raise SystemExit("bye")
'''


@pytest.mark.parametrize(("factory", "expected"), [
    ("advfactories:exits", "model.module: advfactories:exits(**kwargs) raised SystemExit: 3 at "),
    ("advfactories:ExitsInForward", "failed: SystemExit: bye at "),
    ("advexit:f", "model.module: importing 'advexit' raised SystemExit: 5 at "),
])
def test_module_sys_exit_is_one_line(tmp_path: Path, factory: str, expected: str) -> None:
    """sys.exit() in the user's factory, forward or module body ended estimator with that code and no word."""
    pytest.importorskip("torch")
    (tmp_path / "advfactories.py").write_text(FACTORIES)
    (tmp_path / "advexit.py").write_text("import sys\nsys.exit(5)\n")
    fails(["estimate", "--set", f"model.module={factory}", "--set", f"model.search_dir={tmp_path}",
           "--set", "model.inputs=[{shape: [2, 4]}]"], expected)
