"""FSDP2's ranks from the shared step plus each rank's optimizer events (``fsdp_split.py``) equal the full
per-rank simulation and the flat replay of ``unit_events``, rank by rank, over a grid of layouts."""

from __future__ import annotations

import pytest

import estimator.parallel.fsdp as fsdp
from estimator import load_config
from estimator.parallel import clear_caches, rank_groups
from estimator.parallel.base import RankContext
from estimator.parallel.fsdp import unit_events
from estimator.periodic import Segment, summary_of
from estimator.simulate import assemble_step, round_blocks

TINY = {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 32, "max_seq_len": 8}


def _config(layers: int, *extra: str, model: dict | None = None):  # noqa: ANN202
    base = {"model": {**(model or TINY), "num_layers": layers}}
    return load_config(None, ["training.seq_len=8", "training.batch_size=3", *extra], base=base)


def _moe(layers: int, *extra: str):  # noqa: ANN202
    from tests.moe.conftest import SMALL

    return _config(layers, *extra, model={"family": "moe", **SMALL["mixtral"]})


def _full(monkeypatch: pytest.MonkeyPatch, cfg, strategy: str, n: int, device: str):  # noqa: ANN001, ANN202
    """The same layout with every rank's whole step simulated (the split turned off)."""
    with monkeypatch.context() as m:
        m.setattr(fsdp, "_split_step", lambda *a: None)
        clear_caches()
        try:
            return rank_groups(cfg, strategy, n, device)
        finally:
            clear_caches()


CASES = [
    pytest.param(lambda: _config(17, "optimizer.name=adamw"), "zero3", id="transformer-17-adamw"),
    pytest.param(lambda: _config(5, "optimizer.name=adagrad"), "zero3", id="transformer-5-adagrad-constructor"),
    pytest.param(lambda: _config(17, "optimizer.name=adam8bit", "training.precision=bf16",
                                 "training.master_weights=true"), "zero3", id="master-weights-adam8bit"),
    pytest.param(lambda: _config(17, "optimizer.name=adafactor", "parallel.reshard_after_forward=false"), "fsdp",
                 id="fsdp-no-reshard-adafactor"),
    pytest.param(lambda: _config(17, "optimizer.name=adamw", "parallel.offload=true"), "zero3", id="offload"),
    pytest.param(lambda: _config(17, "optimizer.name=sgd", "training.grad_accum_steps=3",
                                 "parallel.sync_every_micro_batch=false", "training.precision=amp-bf16"), "zero3",
                 id="accumulation-no-sync"),
    pytest.param(lambda: _config(17, "optimizer.name=lion", "optimizer.implementation=for-loop"), "zero3",
                 id="for-loop-lion"),
    pytest.param(lambda: _moe(17, "optimizer.name=adamw"), "zero3", id="moe-17"),
    pytest.param(lambda: _moe(18, "optimizer.name=adamw", "model.first_dense_layers=3", "model.d_ff=12"), "zero3",
                 id="moe-dense-first-layers"),
]


@pytest.mark.parametrize(("make", "strategy"), CASES)
def test_split_ranks_equal_the_full_simulation(monkeypatch: pytest.MonkeyPatch, make, strategy: str) -> None:  # noqa: ANN001
    from estimator.parallel.fsdp_split import split_rank_step

    cfg = make()
    for n, device in ((3, "cpu"), (40, "cuda")):
        clear_caches()
        split_rank_step(RankContext(cfg, n, device), 0, strategy == "zero3" or cfg.parallel.reshard_after_forward)
        fast = rank_groups(cfg, strategy, n, device)
        full = _full(monkeypatch, cfg, strategy, n, device)
        assert [(g.ranks, g.estimate) for g in fast] == [(g.ranks, g.estimate) for g in full], (n, device)


@pytest.mark.parametrize(("make", "strategy"), [CASES[0], CASES[1]])
def test_split_ranks_equal_the_flat_replay(make, strategy: str) -> None:  # noqa: ANN001
    """Each distinct rank's peaks against ``unit_events`` replayed flat (index, phase and roles too)."""
    cfg = make()
    clear_caches()
    for device in ("cpu", "cuda"):
        for group in rank_groups(cfg, strategy, 40, device)[:3]:
            rank = group.ranks[0][0]
            setup, first, steady = unit_events(RankContext(cfg, 40, device), rank,
                                               reshard_after_forward=strategy == "zero3")
            if device == "cuda":
                setup, first, steady = round_blocks(setup), round_blocks(first), round_blocks(steady)
            flat = assemble_step(setup, first, steady)
            assert (group.estimate.step.first_peak, group.estimate.step.steady_peak) == (
                flat.first_peak, flat.steady_peak), (device, rank)


def test_the_split_is_taken_for_a_preset() -> None:
    """Not only equal when it runs: the split really answers a preset's ranks (no silent fallback)."""
    from estimator.parallel.fsdp_split import split_rank_step

    cfg = load_config(None, ["optimizer.name=adamw"], base={"model": {"preset": "llama-2-7b"}})
    step = split_rank_step(RankContext(cfg, 1024, "cuda"), 0, True)
    assert step.steady_peak.bytes > step.first_peak.bytes > 0


@pytest.mark.parametrize("dense", [0, 1, 3])
def test_the_shared_step_repeats_after_dense_first_layers(dense: int) -> None:
    """FSDP2's shared rank step is read off small layer counts (not built flat) whatever the dense first layers:
    DeepSeek-V3's 3 need a base of 3 + 3 layers (``fsdp_split.unit_programs``), and it equals the flat lists."""
    from estimator.parallel.fsdp_split import _shared_lists, unit_programs
    from estimator.periodic import program_length

    cfg = _moe(18, "optimizer.name=adamw", f"model.first_dense_layers={dense}", "model.d_ff=12")
    build = _shared_lists(8, "cuda", True)
    programs = unit_programs(cfg, build, round_blocks, None)
    assert any(segment.count > 1 for program in programs for segment in program)
    flat = [round_blocks(events) for events in build(cfg)]
    assert [program_length(p) for p in programs] == [len(events) for events in flat]
    for program, events in zip(programs, flat, strict=True):
        assert _same(summary_of(program), summary_of((Segment(tuple(events)),))) if events else not program


def _same(a, b) -> bool:  # noqa: ANN001
    """Equal summaries, the per-role tuples compared as totals (their order follows the events')."""
    def norm(roles):  # noqa: ANN001, ANN202
        return {role: n for role, n in roles if n}

    return (a.length, a.delta, norm(a.roles), a.rise, a.rise_index, a.rise_phase, norm(a.rise_roles)) == (
        b.length, b.delta, norm(b.roles), b.rise, b.rise_index, b.rise_phase, norm(b.rise_roles))
