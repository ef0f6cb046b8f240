"""An FSDP2 rank's own optimizer events summarised from its shards' shapes (``parallel/fsdp_own.py``) equal the
same events built at small layer counts and read as programs (``fsdp_split._own_programs``, the path it
replaces), for every optimizer, implementation, device and distinct rank, and the rank's peaks with them."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.errors import EstimatorError
from estimator.optimizers import optimizer_names
from estimator.parallel.base import RankContext
from estimator.parallel.fsdp import Zero3, rank_model_states, shard, sharded_model_states
from estimator.parallel.fsdp_own import own_summaries
from estimator.parallel.fsdp_split import _own_programs, split_rank_step
from estimator.simulate import _shape_key
from tests.test_speed_fsdp import _same

TINY = {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 40, "max_seq_len": 8}


def _config(optimizer: str, implementation: str, *extra: str):  # noqa: ANN202
    base = {"model": {**TINY, "num_layers": 17}}
    return load_config(None, ["training.seq_len=8", "training.batch_size=3", f"optimizer.name={optimizer}",
                              f"optimizer.implementation={implementation}", *extra], base=base)


def _ranks(ctx: RankContext) -> list[int]:
    return [rep for _ranges, rep in Zero3().groups(ctx)]


@pytest.mark.parametrize("optimizer", optimizer_names())
@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_summaries_equal_the_built_events(optimizer: str, implementation: str) -> None:
    try:
        cfg = _config(optimizer, implementation)
    except EstimatorError:
        pytest.skip(f"{optimizer} has no {implementation} implementation")
    for n, device in ((3, "cpu"), (40, "cuda")):
        ctx = RankContext(cfg, n, device)
        finish = ctx.round if device == "cuda" else None
        ranks = _ranks(ctx)
        assert len(ranks) > 1
        for rank in ranks:
            fast = own_summaries(ctx, rank)
            built = _own_programs(ctx, rank, finish, _shape_key(cfg, device))
            assert fast is not None
            assert all(_same(a, b) for a, b in zip(fast, built, strict=True)), (n, device, rank)


@pytest.mark.parametrize("extra", [("training.precision=bf16", "training.master_weights=true"),
                                   ("optimizer.amsgrad=true", "optimizer.weight_decay=0.1"),
                                   ("training.precision=fp16",)])
def test_summaries_under_other_layouts(extra: tuple[str, ...]) -> None:
    cfg = _config("adam", "foreach", *extra)
    ctx = RankContext(cfg, 40, "cuda")
    for rank in _ranks(ctx):
        assert split_rank_step(ctx, rank, True) == split_rank_step(ctx, rank, True, summarised=False)


def test_for_loop_and_offload() -> None:
    """The for-loop script is built (no summary); under CPU offload the rank has no optimizer events."""
    ctx = RankContext(_config("adamw", "for-loop"), 3, "cpu")
    assert own_summaries(ctx, 0) is None
    offload = RankContext(_config("adamw", "foreach", "parallel.offload=true"), 3, "cuda")
    assert all(not s.length for s in own_summaries(offload, 1))


@pytest.mark.parametrize(("optimizer", "n"), [("adamw", 40), ("adafactor", 3), ("adagrad", 24), ("adam8bit", 7)])
def test_rank_model_states_equal_the_shards(optimizer: str, n: int) -> None:
    ctx = RankContext(_config(optimizer, "foreach" if optimizer != "adam8bit" else "auto"), n, "cuda")
    for rank in range(n):
        assert rank_model_states(ctx, rank) == sharded_model_states(ctx, [shard(p, n, rank) for p in ctx.params])


def test_layouts_differing_in_the_optimizer_share_the_shared_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared lists read no optimizer (``fsdp.unit_parts``): a second optimizer searches them no more, and its
    ranks equal a cold estimate's."""
    import estimator.parallel.fsdp_split as split
    from estimator.parallel import clear_caches, rank_groups

    adamw, lion = _config("adamw", "foreach"), _config("lion", "foreach")
    clear_caches()
    rank_groups(adamw, "zero3", 40, "cuda")
    calls = []
    real = split.unit_programs
    monkeypatch.setattr(split, "unit_programs", lambda *a, **k: calls.append(a) or real(*a, **k))
    warm = rank_groups(lion, "zero3", 40, "cuda")
    assert not calls
    clear_caches()
    assert rank_groups(lion, "zero3", 40, "cuda") == warm
    assert len(calls) == 1


@pytest.mark.parametrize("optimizer", optimizer_names())
@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_replicated_ranks_optimizer_summaries_equal_their_events(optimizer: str, implementation: str) -> None:
    """DDP and ZeRO-1/2 ranks: ``optimizer.step()`` over the rank's partition summarised from its shapes equals
    the summary of its events, with and without the fp32 master gradients, on both devices."""
    from estimator.parallel.replicated import ReplicatedParameters
    from estimator.parallel.zero import zero_partition

    for precision in (("training.precision=fp32",), ("training.precision=bf16", "training.master_weights=true"),
                      ("training.precision=amp-bf16",)):
        try:
            cfg = _config(optimizer, implementation, *precision)
        except EstimatorError:
            pytest.skip(f"{optimizer} has no {implementation} implementation")
        for n, device in ((3, "cpu"), (5, "cuda")):
            ctx = RankContext(cfg, n, device)
            shared = ReplicatedParameters(ctx)
            for local in [ctx.trainable, [], *zero_partition(ctx.trainable, n)]:
                for first in (True, False):
                    fast, built = shared.optimizer(local, first), shared.optimizer_events_summary(local, first)
                    assert _same(fast, built) and fast.first_phase == built.first_phase, (
                        precision, n, device, len(local), first)
