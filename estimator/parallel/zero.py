"""ZeRO-1 and ZeRO-2 (Rajbhandari et al. 2020, "ZeRO", section 5): parameters replicated, optimizer
state (ZeRO-1, P_os) and gradients too (ZeRO-2, P_os+g) partitioned over the ranks.

Model states per rank, with P_b, G_b, S_b bytes per element of parameters, gradients and state:

* zero1: P_b·Ψ + G_b·Ψ + S_b·Ψ/N
* zero2: P_b·Ψ + (G_b + S_b)·Ψ/N

"Ψ/N" is what torch really partitions: ``ZeroRedundancyOptimizer._partition_parameters`` assigns whole
tensors, largest first (a stable sort), each to the rank with the fewest elements so far (the first
such rank). ZeRO-1 is DDP plus that optimizer, so its ranks keep DDP's buckets. torch has no ZeRO-2:
it is estimated as DeepSpeed runs it, a gradient that a rank does not own reduced to its owner and
dropped as soon as it is produced.

Ranks that own nothing (N larger than the number of tensors) are all alike and computed once; a rank
that owns k tensors costs O(k) on top of what all ranks share: the forward/backward summarised once,
and for ZeRO-2 the maxima of its live bytes per run of 64 events (``dropped.py``; each of the
rank's k + 1 stretches then costs C-level maxima over 128 events and n / 64 run maxima).
"""

from __future__ import annotations

import heapq

from estimator.events import Event
from estimator.families.base import ParamTensor
from estimator.parallel.base import RankContext, RankEstimate, register_strategy
from estimator.parallel.comm import CommParts, CommVolume, KindVolume, collective_dtypes, empty
from estimator.parallel.ddp import buckets, ddp_communication
from estimator.parallel.dropped import zero2_body
from estimator.parallel.replicated import ReplicatedParameters
from estimator.timeline import Summary, summarize


def zero_partition(params: list[ParamTensor], world_size: int) -> list[list[ParamTensor]]:
    """ZeroRedundancyOptimizer's split: largest first (stable), each to the rank with fewest elements."""
    ranks: list[list[ParamTensor]] = [[] for _ in range(world_size)]
    heap = [(0, r) for r in range(min(world_size, len(params)))]  # ranks beyond len(params) stay empty
    for p in sorted(params, key=lambda t: t.numel, reverse=True):
        size, r = heapq.heappop(heap)
        ranks[r].append(p)
        heapq.heappush(heap, (size + p.numel, r))
    return ranks


class _Partitioned:
    """ZeRO-1/2: the partition once per context; ranks that own nothing form one group."""

    name = ""

    def partition(self, ctx: RankContext) -> list[list[ParamTensor]]:
        return ctx.shared("zero_partition", lambda: zero_partition(ctx.trainable, ctx.world_size))

    def groups(self, ctx: RankContext) -> list[tuple[tuple[tuple[int, int], ...], int]]:
        parts = self.partition(ctx)
        owners = [r for r in range(min(ctx.world_size, len(ctx.trainable))) if parts[r]]
        groups = [(((r, r),), r) for r in owners]
        empty = len(owners)  # owners are 0..k-1: the greedy split fills the lowest ranks first
        if empty < ctx.world_size:
            groups.append((((empty, ctx.world_size - 1),), empty))
        return groups

    def shared(self, ctx: RankContext) -> ReplicatedParameters:
        return ctx.shared("replicated", lambda: ReplicatedParameters(ctx))


@register_strategy
class Zero1(_Partitioned):
    name = "zero1"

    def communication(self, ctx: RankContext, rank: int) -> CommParts:
        """DDP's all-reduces, then ``ZeroRedundancyOptimizer._sync_params`` (:func:`parameter_broadcasts`)."""
        def make() -> CommParts:
            ddp = ddp_communication(ctx, self.name)
            return CommParts(ddp.micro_batch, ddp.gradient_sync, parameter_broadcasts(ctx, self.name),
                             ddp.second_forward)

        return ctx.shared("zero1_communication", make)

    def estimate(self, ctx: RankContext, rank: int) -> RankEstimate:
        local = self.partition(ctx)[rank] if rank < len(ctx.trainable) else []
        grads = ctx.shared("all_grad_bytes", lambda: sum(p.numel for p in ctx.trainable) * ctx.plan.gradient_bytes)
        return self.shared(ctx).rank(self.name, rank, local, buckets(ctx), grads)


@register_strategy
class Zero2(_Partitioned):
    name = "zero2"

    def communication(self, ctx: RankContext, rank: int) -> CommParts:
        """Estimate only (torch has no ZeRO-2): each gradient reduced to its owner as it is produced (one
        ``reduce`` per trainable tensor, in the gradients' dtype), then the owners' parameter broadcasts
        as ZeRO-1. ZeRO section 7: the same 2Ψ on the wire as DDP's all-reduce."""
        def make() -> CommParts:
            n, g_b = ctx.world_size, collective_dtypes(ctx.config, self.name).gradient_bytes
            size = g_b * sum(p.numel for p in ctx.trainable)
            reduce = CommVolume.of(n, {"reduce": KindVolume(len(ctx.trainable), size, size)})
            return CommParts(empty(n), reduce, parameter_broadcasts(ctx, self.name), empty(n))

        return ctx.shared("zero2_communication", make)

    def estimate(self, ctx: RankContext, rank: int) -> RankEstimate:
        local = self.partition(ctx)[rank] if rank < len(ctx.trainable) else []
        dropped = ctx.shared("zero2_body", lambda: zero2_body(ctx))
        owned = {p.name for p in local}
        body = dropped.summary(owned)
        tail = _tail_summary(ctx, owned)  # zero_grad's events are the same after the first and a steady step
        tails = ([tail], [tail])
        grads = sum(p.numel for p in local) * ctx.plan.gradient_bytes
        return self.shared(ctx).rank(self.name, rank, local, [], grads, body=([body], [body]),
                                     tail=tails)  # type: ignore[arg-type]


def _tail_summary(ctx: RankContext, owned: set[str]) -> Summary:
    """``zero_grad`` on a ZeRO-2 rank frees only the gradients it kept (the same events after the first and a
    steady step: ``RankContext.flat_tail``)."""
    tail = ctx.shared("zero2_tail", ctx.flat_tail)
    if ctx.shared("zero2_tail_allocs", lambda: any(e.nbytes > 0 for e in tail)):
        # allocations in the tail: order matters, replay this rank's own
        return summarize([e for e in tail if not (_is_freed_grad(e) and e.name[:-5] not in owned)])
    # only frees: no peak inside, just what is released
    base = ctx.shared("zero2_tail_sum", lambda: summarize(tail))
    frees = ctx.shared("zero2_tail_grads", lambda: {e.name[:-5]: e.nbytes for e in tail if _is_freed_grad(e)})
    mine = [frees[name] for name in owned if name in frees]
    not_mine = ctx.shared("zero2_tail_grad_bytes", lambda: sum(frees.values())) - sum(mine)
    roles = dict(base.roles)
    roles["gradient"] = roles.get("gradient", 0) - not_mine
    return Summary(base.length - (len(frees) - len(mine)), base.delta - not_mine, tuple(roles.items()),
                   0, -1, "", (), base.first_phase)


def _is_freed_grad(e: Event) -> bool:
    return e.role == "gradient" and e.nbytes < 0 and e.name.endswith(".grad")


def parameter_broadcasts(ctx: RankContext, strategy: str) -> CommVolume:
    """``ZeroRedundancyOptimizer.step`` ends with ``_sync_params``: for every rank, each parameter of its
    partition is broadcast from it (``parameters_as_bucket_view=False``, the default: one ``broadcast`` per
    tensor; torch 2.13 ``zero_redundancy_optimizer.py``). Every rank takes part in every broadcast, as
    root or receiver, so each hands over all trainable parameters once per step: the same on every rank.
    """
    p_b = collective_dtypes(ctx.config, strategy).parameter_bytes
    size = p_b * sum(p.numel for p in ctx.trainable)
    return CommVolume.of(ctx.world_size, {"broadcast": KindVolume(len(ctx.trainable), size, size)})
