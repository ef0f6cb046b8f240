"""FSDP2's distinct ranks without re-simulating the step for each: the part every rank shares, once.

Under Shard(0) every rank allocates the same padded storage, all-gathers and reduce-scatters the same
bytes, so a rank's step (``fsdp.unit_events``) is the same events as any other's except where the
rows it really owns are used: the optimizer state it creates (``zeros_like`` of the local shard) and
the temporaries of ``optimizer.step()``. A rank's first step is therefore

    shared forward/backward  ·  its optimizer step  ·  shared zero_grad tail

and its setup the shared setup plus, for an optimizer that makes its state in the constructor, its
own state. The shared lists are rank 0's step built without its optimizer's events (``fsdp.unit_parts``,
which ``unit_events`` completes with them), compressed per layer like the step (``periodic.py``) once per
layout; each rank then costs only its optimizer events, summarised from how many of its shards have each
shape (``fsdp_own.py``; built and compressed per layer for the for-loop implementation), and the peaks
come from composing :class:`~estimator.timeline.Summary` values, which is exact (the summaries form a
monoid: ``timeline.py``). ``tests/test_speed_fsdp.py`` checks every rank's peaks against the full
per-rank simulation.
"""

from __future__ import annotations

from collections.abc import Callable

from estimator.config import Config
from estimator.events import Event
from estimator.parallel.base import RankContext, RankStep, chain
from estimator.parallel.fsdp_own import own_summaries
from estimator.periodic import Program, Segment, map_events, periodic_programs, summary_of
from estimator.simulate import (
    COMPRESS_ABOVE_LAYERS,
    _shape_key,
    optimizer_step_events,
    state_events,
    with_layers,
)
from estimator.timeline import Summary, peak_of

#: families whose FSDP2 step is split this way (``unit_events`` on their marked events)
SPLIT_FAMILIES = ("transformer", "moe")


def _optimizer_lists(small: RankContext, rank: int) -> tuple[list[Event], list[Event], list[Event]]:
    """What ``unit_events`` adds for ``rank``'s own rows: constructor state (setup), then each step's
    ``optimizer.step()`` (nothing on the device under CPU offload)."""
    from estimator.parallel.fsdp import shard

    if small.config.parallel.offload:
        return [], [], []
    local = [shard(p, small.world_size, rank).local for p in small.params if p.trainable]
    setup = (state_events(small.spec, local, small.config, "setup", small.step_bytes)
             if small.spec.state_init == "constructor" else [])
    return (setup,
            optimizer_step_events(small.spec, local, small.config, small.impl, small.step_bytes, first=True),
            optimizer_step_events(small.spec, local, small.config, small.impl, small.step_bytes, first=False))


def _shared_lists(world_size: int, device: str, reshards: bool) -> Callable[[Config], list[list[Event]]]:
    """Rank 0's step less its optimizer's events (``fsdp.unit_parts``): setup, the forward/backward with
    FSDP2's hooks (the same in the first and a steady step) and the zero_grad tail. Built without the
    optimizer's events at all: what every rank shares does not depend on them, and a rank's own are
    summarised for it (``fsdp_own.py``)."""
    from estimator.parallel.fsdp import unit_parts

    def build(cfg: Config) -> list[list[Event]]:
        setup, body, tail, _local = unit_parts(RankContext(cfg, world_size, device), 0, reshards)
        return [setup, body, tail]

    return build


def split_rank_step(ctx: RankContext, rank: int, reshards: bool, summarised: bool = True) -> RankStep:
    """``rank``'s first- and steady-step peaks from the shared lists (summarised once per layout,
    :func:`_shared_summaries`) and its own optimizer events.

    ``summarised``: the own events' summaries from the shards' sizes where the optimizer's implementation
    allows it (``fsdp_own.py``); False builds them (``_own_programs``), as the tests' reference."""
    finish = ctx.round if ctx.device == "cuda" else None
    setup_roles, body, tail = ctx.shared(f"fsdp_split_{reshards}", lambda: _shared_summaries(ctx, reshards, finish))
    own_setup, own_first, own_steady = (own_summaries(ctx, rank) if summarised else None) or \
        _own_programs(ctx, rank, finish, _shape_key(ctx.config, ctx.device))
    live = dict(setup_roles)
    for role, n in own_setup.roles:
        live[role] = live.get(role, 0) + n
    first = chain([body, own_first, tail])
    steady = chain([body, own_steady, tail])
    live_steady = dict(live)
    for role, n in first.roles:
        live_steady[role] = live_steady.get(role, 0) + n
    saved = ctx.shared("saved_activation_bytes", lambda: _saved_bytes(ctx))  # the key Zero3.estimate reads
    return RankStep(peak_of(first, live), peak_of(steady, live_steady), saved)


def _shared_summaries(ctx: RankContext, reshards: bool, finish: Callable[[list[Event]], list[Event]] | None
                      ) -> tuple[dict[str, int], Summary, Summary]:
    """The shared lists' summaries (setup as its totals per role), made once per layout in a process.

    The lists do not read the optimizer (``fsdp.unit_parts``): layouts that differ only there (a fit's
    8-bit Adam alternative) share them, and so do zero3 and fsdp on the same config when fsdp reshards
    after forward. The periodic search's shape key leaves the batch size out as well
    (``periodic_programs``: where only sizes change, two small block counts are built, not four).
    """
    data = ctx.config.model_dump(mode="json")
    data.pop("optimizer", None)
    key = (f"{ctx.device}:{data}", ctx.world_size, reshards)
    if key not in _SHARED:
        data["training"].pop("batch_size", None)
        programs = unit_programs(ctx.config, _shared_lists(ctx.world_size, ctx.device, reshards), finish,
                                 (f"{ctx.device}:{data}", "fsdp-shared", reshards))
        setup, body, tail = (summary_of(p) for p in programs)
        if len(_SHARED) >= 64:
            _SHARED.pop(next(iter(_SHARED)))
        _SHARED[key] = (dict(setup.roles), body, tail)
    roles, body, tail = _SHARED[key]
    return dict(roles), body, tail


_SHARED: dict[tuple[str, int, bool], tuple[dict[str, int], Summary, Summary]] = {}


def clear_shared() -> None:
    """Forget the shared summaries (``parallel.clear_caches``: a benchmark times a cold estimate)."""
    _SHARED.clear()


def _own_programs(ctx: RankContext, rank: int, finish: Callable[[list[Event]], list[Event]] | None,
                  key: str) -> tuple[Summary, Summary, Summary]:
    """``rank``'s own events built at small layer counts and read as programs (``unit_programs``), summarised."""

    def own(cfg: Config) -> list[list[Event]]:
        return list(_optimizer_lists(RankContext(cfg, ctx.world_size, ctx.device), rank))

    setup, first, steady = (summary_of(p) for p in unit_programs(ctx.config, own, finish, (key, "fsdp-own"),
                                                                 hooks=False))
    return setup, first, steady


def unit_programs(config: Config, build: Callable[[Config], list[list[Event]]],
                  finish: Callable[[list[Event]], list[Event]] | None, shape_key: object,
                  hooks: bool = True) -> tuple[Program, ...]:
    """``build(config)``'s lists as programs, read off small layer counts (``periodic.py``), each list passed
    through ``finish``; the flat lists, one segment each, where the model is small or they do not repeat.

    As ``simulate.layered_programs``, but from the base FSDP2's hooks need: a unit's hooks touch its
    neighbours (the next unit's all-gather is prefetched, the previous one's reduce-scatter input freed),
    so a repeated unit is one with a repeated unit on either side, and the smallest model that has one
    has the dense first layers (DeepSeek-V3's 3), a first, a middle and a last period of repeated layers.
    From fewer layers the pattern read is not the model's and the check fails: DeepSeek-V3's ranks were
    built flat, all 61 layers, at every world size (``tests/test_speed_fsdp.py``). ``hooks=False``: lists
    without FSDP2's hooks (a rank's optimizer events), read from the dense layers and two periods.
    """
    done = finish or (lambda events: events)
    layers = getattr(config.model, "num_layers", None)
    if isinstance(layers, int) and layers > COMPRESS_ABOVE_LAYERS:
        period = max(1, getattr(config.model, "moe_layer_step", 1) or 1)
        base = (getattr(config.model, "first_dense_layers", 0) or 0) + (3 if hooks else 2) * period
        filled: list[tuple[int, ...]] = []

        def distinct(n: int) -> list[list[Event]]:
            lists = build(with_layers(config, n))
            pattern = tuple(_same_as(lists, i) for i in range(len(lists)))
            if filled and pattern != filled[0]:
                raise ValueError("the lists are empty, or equal, at some layer counts only")
            filled.append(pattern)
            return [events for i, events in enumerate(lists) if pattern[i] == i]

        found = periodic_programs(distinct, layers, base=base, shape_key=shape_key, period=period)
        if found is not None:
            # a list equal to an earlier one at every count built has the same program (the first and the
            # steady step's shared forward/backward): searched once
            made = dict(zip([i for i, same in enumerate(filled[0]) if same == i], found, strict=True))
            return tuple(map_events(made[same], done) if same >= 0 else () for same in filled[0])
    return tuple((Segment(tuple(done(events))),) if events else () for events in build(config))


def _same_as(lists: list[list[Event]], i: int) -> int:
    """-1 for an empty list, else the first list equal to ``lists[i]`` (``i`` itself when none before it is)."""
    if not lists[i]:
        return -1
    return next(j for j in range(i + 1) if lists[j] == lists[i])


def _saved_bytes(ctx: RankContext) -> int:
    """Bytes saved for backward by one micro-batch, as the estimate on the rank's device counts them
    (``api._saved_bytes``: off a CUDA step's unrounded programs, which the estimate of the same config
    has already made), not by simulating the step on the CPU once more."""
    from estimator.api import _saved_bytes as saved
    from estimator.simulate import simulate

    if ctx.device != "cuda":
        return ctx.base.saved_activation_bytes
    return saved(ctx.config, simulate(ctx.config, "cuda"))
