"""The fit's shortcuts give what the plain searches give: the smallest zero3 world size (rank 0 asked first)
against the bisection that computes every distinct rank of each world size it tries, and the per-process
caches of rank estimates against a fresh computation."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.fit import WORLD_SIZES, _smallest_world, step_peak
from estimator.parallel import clear_caches, per_rank_estimate, rank_groups

TINY = {"family": "transformer", "d_model": 64, "num_heads": 4, "vocab_size": 512, "max_seq_len": 64}


def _bisection(cfg, budget: int) -> tuple[int, int, str] | None:  # noqa: ANN001
    """The search as it was before rank 0 was asked first: every distinct rank of every world size it tries."""
    if step_peak(cfg, "zero3", WORLD_SIZES[-1])[0] > budget:
        return None
    lo, hi = -1, len(WORLD_SIZES) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if step_peak(cfg, "zero3", WORLD_SIZES[mid])[0] <= budget:
            hi = mid
        else:
            lo = mid
    return WORLD_SIZES[hi], *step_peak(cfg, "zero3", WORLD_SIZES[hi])


@pytest.mark.parametrize("layers", [3, 17])
def test_smallest_world_equals_the_bisection_over_every_rank(layers: int) -> None:
    cfg = load_config(None, ["training.seq_len=64", "training.batch_size=2", "optimizer.name=adamw"],
                      base={"model": {**TINY, "num_layers": layers}})
    peaks = [step_peak(cfg, "zero3", n)[0] for n in WORLD_SIZES]
    # budgets between consecutive world sizes' peaks, below the smallest and above the largest
    budgets = sorted({p + d for p in peaks for d in (-1, 0)} | {min(peaks) - 10**6, max(peaks) + 10**6})
    for budget in budgets:  # every world size's estimate computed once above, kept by the caches
        assert _smallest_world(cfg, budget) == _bisection(cfg, budget), budget


def test_cached_rank_estimates_equal_fresh_ones() -> None:
    cfg = load_config(None, ["training.seq_len=64", "optimizer.name=adam"],
                      base={"model": {**TINY, "num_layers": 4}})
    for strategy, n in (("zero2", 8), ("zero3", 96), ("ddp", 3)):
        clear_caches()
        first = rank_groups(cfg, strategy, n, "cuda")
        first.pop()  # the caller's list is its own
        again = rank_groups(cfg, strategy, n, "cuda")
        assert len(again) == len(first) + 1
        clear_caches()
        fresh = rank_groups(cfg, strategy, n, "cuda")
        assert [(g.ranks, g.estimate) for g in again] == [(g.ranks, g.estimate) for g in fresh]
        for group in fresh:
            rank = group.ranks[-1][1]
            clear_caches()
            alone = per_rank_estimate(cfg, strategy, n, "cuda", rank)
            assert (alone.step, alone.optimizer_state, alone.parameters) == (
                group.estimate.step, group.estimate.optimizer_state, group.estimate.parameters), (strategy, rank)
