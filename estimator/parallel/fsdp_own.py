"""An FSDP2 rank's own part of the step, summarised from how many of its shards have each shape.

``fsdp_split.py`` splits a rank's step into the part every rank shares and the rank's own optimizer
events: the state it creates for the rows it holds and the temporaries of ``optimizer.step()``. Under
torch's foreach (and fused) implementation those events are, in order (``simulate.optimizer_step_events``,
``simulate.state_events``, ``simulate._foreach_events``; torch's ``_multi_tensor_*`` optimizers):

- state (the first step, or the constructor's in setup): per parameter its 'step' scalar if any, then
  each of its state tensors: allocations only;
- foreach: the ``step_increment`` scalar made and dropped; each op of the optimizer's foreach script
  allocates one temporary per parameter (a list over all of them, in parameter order) or frees such a
  list (last first); lists still held are freed at return, the last made first.

Each of these is a run of allocations (or of frees) of one role in one phase. The timeline summary of
such a run (``timeline.Summary``, a monoid: its summaries compose exactly) depends only on its length,
its total and where its last nonzero allocation is (live bytes only rise through it): so a rank's
optimizer events are summarised from the count of its shards of each local shape, in O(distinct shapes ·
ops), instead of built at several small layer counts and searched for their period (``periodic.py``)
once per rank. CUDA's 512-byte blocks are applied per event, as the events' ``round_blocks`` does.

The for-loop implementation (one script per parameter, a temporary living until the next parameter
rebinds its name) is not a few such runs: :func:`own_summaries` returns None there and the caller
builds the events. ``tests/test_fsdp_own.py`` checks these summaries' peaks against the built events'.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from math import prod

from estimator.families.base import ParamTensor
from estimator.parallel.base import RankContext, chain
from estimator.parallel.fsdp import local_shape
from estimator.precision import training_plan
from estimator.simulate import round_size, state_nbytes
from estimator.timeline import Summary

Shape = tuple[int, ...]


def run_summary(role: str, phase: str, length: int, total: int, last: int, allocates: bool) -> Summary:
    """``timeline.summarize`` of ``length`` events of one role and phase, all allocations (``allocates``) or all
    frees, of ``total`` bytes together, the last nonzero one at index ``last`` (-1: none).

    Through a run of allocations live bytes rise at each nonzero event: the highest prefix is the total,
    first reached at the last nonzero event; a run of frees never rises above its start.
    """
    if not length:
        return Summary()
    if not total:
        return Summary(length, 0, (), 0, -1, "", (), phase)
    if allocates:
        return Summary(length, total, ((role, total),), total, last, phase, ((role, total),), phase)
    return Summary(length, -total, ((role, -total),), 0, -1, "", (), phase)


class _Shards:
    """A rank's trainable tensors as shapes: each tensor's shape in parameter order (``order``), how many have each
    (``counts``), and the shape of the rank's own part of it (``local``: FSDP2's rows, or the whole tensor)."""

    def __init__(self, order: list[Shape], counts: Counter[Shape], local: dict[Shape, Shape]) -> None:
        self.order = order
        self.local = local
        self.counts = counts

    @classmethod
    def of_rank(cls, ctx: RankContext, rank: int) -> _Shards:
        """An FSDP2 rank's shards of every trainable parameter."""
        order, counts = ctx.shared("fsdp_own_shapes", lambda: _trainable_shapes(ctx.params))
        return cls(order, counts, {shape: local_shape(shape, ctx.world_size, rank) for shape in counts})

    @classmethod
    def whole(cls, params: list[ParamTensor]) -> _Shards:
        """Whole tensors (a replicated-parameter rank's partition: DDP, ZeRO-1/2), the trainable ones."""
        order, counts = _trainable_shapes(params)
        return cls(order, counts, {shape: shape for shape in counts})

    def run(self, sizes_of: Callable[[Shape], list[int]]) -> tuple[int, int, int]:
        """(length, total, index of the last nonzero size) of the run that gives each shard, in parameter
        order, the events of sizes ``sizes_of(its local shape)``."""
        sizes = {shape: sizes_of(local) for shape, local in self.local.items()}
        length = sum(n * len(sizes[shape]) for shape, n in self.counts.items())
        total = sum(n * sum(sizes[shape]) for shape, n in self.counts.items())
        after = 0
        for shape in reversed(self.order):
            mine = sizes[shape]
            after += len(mine)
            for i in range(len(mine) - 1, -1, -1):
                if mine[i]:
                    return length, total, length - after + i
        return length, total, -1


def _trainable_shapes(params: list[ParamTensor]) -> tuple[list[Shape], Counter[Shape]]:
    """The trainable tensors' shapes in parameter order, and how many have each."""
    order = [p.shape for p in params if p.trainable]
    return order, Counter(order)


def own_summaries(ctx: RankContext, rank: int) -> tuple[Summary, Summary, Summary] | None:
    """Summaries of ``rank``'s own events (``fsdp_split._optimizer_lists``: constructor state in setup, the first
    step's and a steady step's ``optimizer.step()``), each event rounded as the rank's device counts it;
    None for the for-loop implementation."""
    if ctx.config.parallel.offload:  # CPUOffloadPolicy: the optimizer steps the host's shards
        return Summary(), Summary(), Summary()
    return optimizer_summaries(ctx, _Shards.of_rank(ctx, rank))


def optimizer_summaries(ctx: RankContext, shards: _Shards) -> tuple[Summary, Summary, Summary] | None:
    """Summaries of the optimizer's events over ``shards`` (constructor state in setup, the first step's and a
    steady step's ``optimizer.step()``: ``simulate.state_events`` and ``simulate.optimizer_step_events``), each
    event rounded as ``ctx``'s device counts it; None for the for-loop implementation."""
    impl, spec, config = ctx.impl, ctx.spec, ctx.config
    if impl not in ("foreach", "fused"):
        return None
    rnd: Callable[[int], int] = round_size if ctx.device == "cuda" else int
    step = [rnd(ctx.step_bytes)] if spec.step_tensor and ctx.step_bytes else []

    def state_sizes(shape: Shape) -> list[int]:
        return step + [rnd(int(b)) for _, b in state_nbytes(spec, ParamTensor("p", shape, True), config)]

    state_stats = shards.run(state_sizes)

    def state(phase: str) -> Summary:
        return run_summary("optimizer_state", phase, *state_stats, allocates=True)

    elem = training_plan(config.training).state_bytes
    temp_stats = shards.run(lambda shape: [rnd(prod(shape) * elem)])

    def step_events(first: bool) -> Summary:
        phase = "optimizer_step"
        parts: list[Summary] = []
        if first and spec.state_init == "first_step":
            parts.append(state(phase))
        inline = first and spec.state_init == "first_step_inline"
        if impl == "fused":
            return chain([*parts, state(phase)] if inline else parts)
        if step:  # torch._foreach_add_(steps, torch.tensor(1.0))
            parts += [run_summary("temporary", phase, 1, step[0], 0 if step[0] else -1, True),
                      run_summary("temporary", phase, 1, step[0], -1, False)]
        script = spec.foreach_script(config.optimizer)
        if inline and not any(op.action == "state" for op in script):
            parts.append(state(phase))
        live: dict[str, None] = {}
        length, total, last = temp_stats
        for op in script:
            if op.action == "state":
                if inline:
                    parts.append(state(phase))
            elif op.action == "alloc":
                live[op.name] = None
                parts.append(run_summary("temporary", phase, length, total, last, True))
            else:
                del live[op.name]
                parts.append(run_summary("temporary", phase, length, total, -1, False))
        parts += [run_summary("temporary", phase, length, total, -1, False) for _ in live]
        return chain(parts)

    setup = state("setup") if spec.state_init == "constructor" else Summary()
    return setup, step_events(True), step_events(False)



def replicated_optimizer_summaries(ctx: RankContext, local: list[ParamTensor]) -> tuple[Summary, Summary] | None:
    """A replicated-parameter rank's ``optimizer.step()`` over its partition ``local`` (DDP: every parameter;
    ZeRO-1/2: its own), the first and a steady step, with the fp32 master gradients made before it
    (``layouts.master_grad_events``, one run of allocations) where the layout keeps them apart: the events of
    ``ReplicatedParameters.optimizer`` summarised from the partition's shapes, in O(distinct shapes · ops)
    instead of O(tensors · ops) events built (``tests/test_fsdp_own.py``); None for the for-loop implementation."""
    from estimator.layouts import separate_master_copy

    shards = _Shards.whole(local)
    found = optimizer_summaries(ctx, shards)
    if found is None:
        return None
    _setup, first, steady = found
    if not separate_master_copy(ctx.config):
        return first, steady
    rnd: Callable[[int], int] = round_size if ctx.device == "cuda" else int
    masters = run_summary("gradient", "optimizer_step", *shards.run(lambda shape: [rnd(4 * prod(shape))]),
                          allocates=True)
    return masters.then(first), masters.then(steady)
