"""Per-rank memory under DDP / ZeRO-1/2/3: hand-derived model states, and real gloo runs on the CPU."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.distributed import ddp_bucket_bytes, model_state_bytes, per_rank_estimate, per_rank_estimates
from estimator.families.base import ParamTensor

D, L, B = 256, 4, 8
SEED_LIKE = [f"model.dim={D}", f"model.num_layers={L}", "optimizer.name=adam", f"training.batch_size={B}"]


def _config(*extra: str):  # noqa: ANN202
    return load_config(None, overrides=[*SEED_LIKE, *extra])


# Hand derivation (fp32, adam: 2 state tensors, 4 bytes each), Ψ = 4·256² + 256 = 262,400 parameters.
PSI = L * D * D + D
LAYER, HEAD = D * D * 4, D * 4  # bytes of one layer's weight and of the head


@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_model_states(rank: int) -> None:
    """ZeRO section 5, DDP: everything replicated, plus one gradient-sized set of DDP buckets."""
    r = per_rank_estimate(_config(), "ddp", 2, "cpu", rank)
    assert (r.parameters, r.gradients, r.optimizer_state) == (4 * PSI, 4 * PSI, 8 * PSI)
    assert r.communication == 4 * PSI  # one bucket: 1,049,600 B crosses the 1 MiB first-bucket cap at layer 0


def test_zero1_model_states() -> None:
    """P_os: state split by ZeroRedundancyOptimizer's greedy partition: rank 0 {L0, L2, head}, rank 1 {L1, L3}."""
    r0, r1 = per_rank_estimates(_config(), "zero1", 2, "cpu")
    assert (r0.parameters, r0.gradients) == (r1.parameters, r1.gradients) == (4 * PSI, 4 * PSI)
    assert r0.optimizer_state == 2 * (2 * LAYER + HEAD)  # exp_avg + exp_avg_sq
    assert r1.optimizer_state == 2 * (2 * LAYER)
    assert r0.optimizer_step_tensors == 3 * 4 and r1.optimizer_step_tensors == 2 * 4


def test_zero2_model_states() -> None:
    """P_os+g: gradients follow the state partition (estimate only; torch has no ZeRO-2)."""
    r0, r1 = per_rank_estimates(_config(), "zero2", 2, "cpu")
    assert r0.parameters == 4 * PSI
    assert (r0.gradients, r1.gradients) == (2 * LAYER + HEAD, 2 * LAYER)
    assert r0.communication == 0


@pytest.mark.parametrize("rank", [0, 1])
def test_zero3_model_states(rank: int) -> None:
    """P_os+g+p: FSDP2 splits every tensor along dim 0: (128, 256) per layer and (128, 1) of the head."""
    r = per_rank_estimate(_config(), "zero3", 2, "cpu", rank)
    assert r.parameters == r.gradients == 4 * PSI // 2
    assert r.optimizer_state == 8 * PSI // 2


def test_ideal_zero_formulas() -> None:
    """The paper's Ψ/N figures for N = 2 (K = 8 bytes of Adam state per fp32 parameter)."""
    cfg = _config()
    assert model_state_bytes(cfg, "ddp", 2) == {"parameters": 4 * PSI, "gradients": 4 * PSI, "optimizer_state": 8 * PSI}
    assert model_state_bytes(cfg, "zero3", 2) == {"parameters": 2 * PSI, "gradients": 2 * PSI,
                                                  "optimizer_state": 4 * PSI}


def test_bucket_caps() -> None:
    """First bucket closes at 1 MiB, the others at 25 MiB, filled from the last parameter backwards."""
    params = [ParamTensor(f"w{i}", (1024, 1024)) for i in range(10)]  # 4 MiB each in fp32
    assert ddp_bucket_bytes(params, 4) == [4 << 20, 28 << 20, 8 << 20]


def test_activations_unchanged() -> None:
    cfg = _config()
    assert {per_rank_estimate(cfg, s, 2, "cpu").activations for s in ("ddp", "zero1", "zero2", "zero3")} == {
        B * D * L * 4 + B * 4
    }


# --------------------------------------------------------------------------- real runs (gloo, 2 processes)
def _real(strategy: str, config):  # noqa: ANN001, ANN202
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    from estimator.measure.distributed import measure_distributed

    return measure_distributed(config, strategy, 2, timeout=90)


CASES = [
    ("ddp", ()), ("zero1", ()), ("zero3", ()),
    ("zero3", ("model.dim=64", "model.num_layers=3", "optimizer.name=momentum", "training.batch_size=4")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "extra"), CASES)
def test_measured_matches_estimate(strategy: str, extra: tuple[str, ...]) -> None:
    """Each rank's first and steady peaks, to the byte, against the live-tensor tracker."""
    config = _config(*extra)
    for m in _real(strategy, config):
        e = per_rank_estimate(config, strategy, 2, "cpu", m.rank)
        assert (m.first_step.peak_bytes, m.steady_step.peak_bytes) == (e.first_step_peak_bytes, e.peak_bytes), m.rank
        assert (m.parameters, m.gradients, m.optimizer_state) == (e.parameters, e.gradients, e.optimizer_state)
        assert m.first_step.peak_phase == e.step.first_peak.phase
