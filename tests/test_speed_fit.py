"""The fit's shortcuts give what the plain searches give: the smallest zero3 world size (world sizes passed
over by a lower bound, rank 0 asked first) against a scan that computes every distinct rank of every world
size, and the per-process caches of rank estimates against a fresh computation."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.fit import WORLD_SIZES, _activation_floor, _held, _smallest_world, _zero3_lower_bound, step_peak
from estimator.parallel import clear_caches, per_rank_estimate, rank_groups

TINY = {"family": "transformer", "d_model": 64, "num_heads": 4, "vocab_size": 512, "max_seq_len": 64}


def _scan(cfg, budget: int) -> tuple[int, int, str] | None:  # noqa: ANN001
    """The plain answer: the first world size whose worst rank (every distinct rank computed) fits."""
    for n in WORLD_SIZES:
        peak, ranks = step_peak(cfg, "zero3", n)
        if peak <= budget:
            return n, peak, ranks
    return None


def _bisection(cfg, budget: int) -> tuple[int, int, str] | None:  # noqa: ANN001
    """The search as it was: a bisection that assumed the peak falls as the world grows."""
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


def _tiny(layers: int):  # noqa: ANN202
    return load_config(None, ["training.seq_len=64", "training.batch_size=2", "optimizer.name=adamw"],
                       base={"model": {**TINY, "num_layers": layers}})


@pytest.mark.parametrize("layers", [3, 17])
def test_smallest_world_equals_the_scan_over_every_rank(layers: int) -> None:
    cfg = _tiny(layers)
    peaks = [step_peak(cfg, "zero3", n)[0] for n in WORLD_SIZES]
    # budgets between consecutive world sizes' peaks, below the smallest and above the largest
    budgets = sorted({p + d for p in peaks for d in (-1, 0)} | {min(peaks) - 10**6, max(peaks) + 10**6})
    for budget in budgets:  # every world size's estimate computed once above, kept by the caches
        assert _smallest_world(cfg, budget) == _scan(cfg, budget), budget


def test_smallest_world_where_the_peak_rises_again() -> None:
    """17 layers of width 64: the zero3 peak is lowest at 64 ranks (10,668,032 B) and rises past the rows of
    the narrow tensors (71,137,792 B at 8,192): on 12 MB the bisection gave up at 8,192 ranks; 8 fit."""
    cfg = _tiny(17)
    peaks = {n: step_peak(cfg, "zero3", n)[0] for n in WORLD_SIZES}
    assert min(peaks, key=peaks.get) == 64 and peaks[64] == 10_668_032 and peaks[8192] == 71_137_792
    assert peaks[4] > 12_000_000 >= peaks[8]
    assert _bisection(cfg, 12_000_000) is None
    assert _smallest_world(cfg, 12_000_000) == (8, peaks[8], "0-7")


LAYOUTS = [
    ("transformer", []),
    ("transformer", ["training.precision=bf16"]),
    ("transformer", ["training.precision=amp-bf16", "training.activation_checkpointing=full"]),
    ("transformer", ["training.precision=bf16", "training.master_weights=true"]),
    ("transformer", ["training.grad_accum_steps=2", "optimizer.name=adam8bit"]),
    ("transformer", ["parallel.offload=true"]),
    ("moe", ["training.precision=bf16"]),
    ("mlp", ["optimizer.name=sgd"]),
]


@pytest.mark.parametrize(("family", "extra"), LAYOUTS)
def test_zero3_lower_bound_is_below_rank_zero(family: str, extra: list[str]) -> None:
    """The bound that lets the scan pass a world size over never exceeds rank 0's peak (first or steady)."""
    if family == "moe":
        from tests.moe.conftest import SMALL

        model = {"family": "moe", **SMALL["mixtral"], "num_layers": 3}
    elif family == "mlp":
        model = {"family": "mlp", "dim": 64, "num_layers": 3}
    else:
        model = {**TINY, "num_layers": 3}
    shape = [] if family == "mlp" else ["training.seq_len=16"]
    cfg = load_config(None, [*shape, "training.batch_size=2", "optimizer.name=adamw", *extra],
                      base={"model": model})
    sizes = (2, 8, 64, 1024)
    rank0 = {n: per_rank_estimate(cfg, "zero3", n, "cuda", 0) for n in sizes}
    # the floors the scan uses: the single device's, and the activations at any world size's rank-0 peaks
    floors = [_activation_floor(cfg), *(_held(p) for r in rank0.values() for p in (r.step.first_peak,
                                                                                 r.step.steady_peak))]
    assert min(floors) > 0
    for n in sizes:
        for floor in floors:
            bound = _zero3_lower_bound(cfg, n, floor)
            assert bound <= max(rank0[n].peak_bytes, rank0[n].first_step_peak_bytes), (n, floor)


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


@pytest.mark.parametrize("extra", [
    ["optimizer.name=adamw", "training.precision=amp-bf16"],
    ["optimizer.name=adam", "training.precision=bf16", "training.master_weights=true"],
    ["optimizer.name=sgd", "training.activation_checkpointing=full", "training.grad_accum_steps=2"],
])
def test_tp_lower_bound_is_below_the_rank_peak(extra: list[str]) -> None:
    """The fit passes over a tensor-parallel degree whose model states alone exceed the budget: they never
    exceed the rank's peak."""
    from estimator.fit import _tp_lower_bound

    for t in (2, 4):
        cfg = load_config(None, ["training.seq_len=16", "training.batch_size=2", f"parallel.tp_size={t}",
                                 "parallel.strategy=tp", f"parallel.world_size={t}", *extra],
                          base={"model": {**TINY, "num_layers": 3}})
        bound = _tp_lower_bound(cfg, t)
        rank = per_rank_estimate(cfg, "tp", t, "cuda", 0)
        assert 0 < bound <= max(rank.peak_bytes, rank.first_step_peak_bytes), t
