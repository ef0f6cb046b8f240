"""Distinct ranks computed once and composed from shared summaries equal the naive flat replay of every rank."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator import load_config
from estimator.parallel import per_rank_estimates, rank_groups
from estimator.parallel.base import RankContext
from estimator.parallel.fsdp import unit_events
from estimator.simulate import assemble_step, round_blocks
from tests.parallel_reference import per_rank_estimate as reference


def _figures(r):  # noqa: ANN001, ANN202
    return (r.parameters, r.gradients, r.optimizer_state, r.optimizer_step_tensors, r.activations, r.communication,
            r.step.first_peak.bytes, r.step.steady_peak.bytes, r.step.first_peak.phase, r.step.steady_peak.phase,
            r.step.first_peak.by_role, r.step.steady_peak.by_role)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("extra", [("model.num_layers=4", "model.dim=64", "optimizer.name=adam"),
                                   ("model.num_layers=20", "model.dim=16", "optimizer.name=adafactor"),
                                   ("model.num_layers=3", "model.dim=10", "optimizer.name=momentum",
                                    "training.precision=bf16")])
def test_every_rank_equals_the_naive_replay(strategy: str, extra: tuple[str, ...]) -> None:
    cfg = load_config(None, ["training.batch_size=3", *extra])
    for n in (1, 2, 3, 5):
        for device in ("cpu", "cuda"):
            fast = per_rank_estimates(cfg, strategy, n, device)
            for rank in range(n):
                assert _figures(fast[rank]) == _figures(reference(cfg, strategy, n, device, rank)), (n, device, rank)


def test_groups_cover_every_rank_once() -> None:
    cfg = load_config(None, ["optimizer.name=adamw"], base={"model": {"preset": "llama-2-7b"}})
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        groups = rank_groups(cfg, strategy, 4096, "cuda")
        covered = sorted(r for g in groups for a, b in g.ranks for r in range(a, b + 1))
        assert covered == list(range(4096)), strategy


def test_fsdp_rank_step_compressed_equals_flat() -> None:
    """A rank's FSDP2 step of a 24-block transformer, read off small block counts, equals the flat one."""
    cfg = load_config(None, ["model.num_layers=24", "training.seq_len=8", "optimizer.name=adamw"],
                      base={"model": {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 32,
                                      "max_seq_len": 8}})
    for device in ("cpu", "cuda"):
        for rank, estimate in enumerate(per_rank_estimates(cfg, "zero3", 3, device)):
            setup, first, steady = unit_events(RankContext(cfg, 3, device), rank)
            if device == "cuda":
                setup, first, steady = round_blocks(setup), round_blocks(first), round_blocks(steady)
            flat = assemble_step(setup, first, steady)
            assert (estimate.step.first_peak, estimate.step.steady_peak) == (flat.first_peak, flat.steady_peak)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=300), st.data())
def test_zero2_stretch_maximum_is_the_first_maximum(sizes: list[int], data: st.DataObject) -> None:
    """``DroppedGradients._argmax`` (runs of 64 events and their maxima) against a plain scan, ties included."""
    from estimator.events import Event
    from estimator.parallel.dropped import DroppedGradients

    dropped = DroppedGradients([Event(f"t{i}", "temporary", n, "forward") for i, n in enumerate(sizes)])
    for _ in range(20):
        lo = data.draw(st.integers(0, len(sizes) - 1))
        hi = data.draw(st.integers(lo, len(sizes) - 1))
        window = dropped.h[lo:hi + 1]
        assert dropped._argmax(lo, hi) == lo + window.index(max(window)), (lo, hi)
