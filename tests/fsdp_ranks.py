"""The check every real-rank FSDP2 test makes: each rank's model states equal, its peaks between the two
gradient orders gloo shows (docs/distributed.md: a block's last gradients released before or after its
reduce-scatter, unit by unit; the estimate reports the first)."""

from __future__ import annotations

from typing import Any

import pytest


def assert_fsdp2_ranks_match(cfg: Any, strategy: str = "zero3", world_size: int = 2, timeout: float = 300) -> None:
    """Run ``cfg`` on ``world_size`` real gloo ranks under FSDP2 and compare every rank with the estimate."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    from estimator.measure.distributed import measure_distributed
    from estimator.parallel import per_rank_estimate
    from estimator.parallel.base import RankContext
    from estimator.parallel.fsdp import unit_events
    from estimator.simulate import assemble_step

    for m in measure_distributed(cfg, strategy, world_size, timeout=timeout):
        e = per_rank_estimate(cfg, strategy, world_size, "cpu", m.rank)
        assert (m.parameters, m.gradients, m.optimizer_state) == (e.parameters, e.gradients, e.optimizer_state)
        reshards = strategy == "zero3" or cfg.parallel.reshard_after_forward
        late = assemble_step(*unit_events(RankContext(cfg, world_size, "cpu"), m.rank,
                                          reshard_after_forward=reshards, late_gradients=True))
        assert e.first_step_peak_bytes <= m.first_step.peak_bytes <= late.first_peak.bytes
        assert e.peak_bytes <= m.steady_step.peak_bytes <= late.steady_peak.bytes
