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
and for ZeRO-2 the maxima of its live bytes per run of 64 events (:class:`DroppedGradients`; each of the
rank's k + 1 stretches then costs C-level maxima over 128 events and n / 64 run maxima).
"""

from __future__ import annotations

import heapq

from estimator.events import Event
from estimator.families.base import ParamTensor
from estimator.parallel.base import RankContext, RankEstimate, register_strategy
from estimator.parallel.comm import CommParts, CommVolume, KindVolume, collective_dtypes, empty
from estimator.parallel.ddp import buckets, ddp_communication
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
        dropped = ctx.shared("zero2_body", lambda: DroppedGradients(ctx.flat_body()))
        owned = {p.name for p in local}
        body = dropped.summary(owned)
        tails = tuple([_tail_summary(ctx, first, owned)] for first in (True, False))
        grads = sum(p.numel for p in local) * ctx.plan.gradient_bytes
        return self.shared(ctx).rank(self.name, rank, local, [], grads, body=([body], [body]),
                                     tail=tails)  # type: ignore[arg-type]


def _tail_summary(ctx: RankContext, first: bool, owned: set[str]) -> Summary:
    """``zero_grad`` on a ZeRO-2 rank frees only the gradients it kept."""
    tail = ctx.shared(f"zero2_tail_{first}", lambda: ctx.flat_tail(first))
    if ctx.shared(f"zero2_tail_allocs_{first}", lambda: any(e.nbytes > 0 for e in tail)):
        # allocations in the tail: order matters, replay this rank's own
        return summarize([e for e in tail if not (_is_freed_grad(e) and e.name[:-5] not in owned)])
    # only frees: no peak inside, just what is released
    base = ctx.shared(f"zero2_tail_sum_{first}", lambda: summarize(tail))
    frees = ctx.shared(f"zero2_tail_grads_{first}", lambda: {e.name[:-5]: e.nbytes for e in tail if _is_freed_grad(e)})
    mine = [frees[name] for name in owned if name in frees]
    not_mine = ctx.shared(f"zero2_tail_grad_bytes_{first}", lambda: sum(frees.values())) - sum(mine)
    roles = dict(base.roles)
    roles["gradient"] = roles.get("gradient", 0) - not_mine
    return Summary(base.length - (len(frees) - len(mine)), base.delta - not_mine, tuple(roles.items()),
                   0, -1, "", (), base.first_phase)


def _is_freed_grad(e: Event) -> bool:
    return e.role == "gradient" and e.nbytes < 0 and e.name.endswith(".grad")


class DroppedGradients:
    """The forward/backward of a ZeRO-2 rank: every gradient it does not own is freed right after it appears.

    With ``h(t)`` the live bytes at event t when every gradient not made at t has been dropped, the
    rank's live bytes are ``h(t) + K(t)``, K the bytes of its own gradients live at t (a step function
    that changes only at its own gradients' events). So its peak is a maximum of ``h`` over the
    stretches between its own gradient events, each answered by C-level maxima over two partial runs of
    ``MAX_BLOCK`` events and the kept maxima of the whole runs between them (first maximum on ties).
    """

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.h: list[int] = []
        self.adjust: list[int] = []  # gradient bytes h leaves out at t: allocations before t, frees up to t
        self.shift: list[int] = []  # events inserted (a dropped gradient's free) or removed before t, all dropped
        self.checkpoints: list[dict[str, int]] = []  # live bytes per role before event k * ROLE_STRIDE
        self.owned_events: dict[str, list[int]] = {}
        live = adjust = shift = 0
        roles: dict[str, int] = {}
        for t, e in enumerate(events):
            if not t % ROLE_STRIDE:
                self.checkpoints.append(dict(roles))
            grad = _is_grad_event(e)
            if grad and e.nbytes < 0:
                adjust += e.nbytes  # a dropped gradient was already released: its free changes nothing
                shift -= 1
            self.shift.append(shift)
            live += e.nbytes
            roles[e.role] = roles.get(e.role, 0) + e.nbytes
            self.h.append(live - adjust)
            self.adjust.append(adjust)
            if grad:
                self.owned_events.setdefault(e.name[:-5], []).append(t)
                if e.nbytes > 0:
                    adjust += e.nbytes  # dropped right after it appears
                    shift += 1
        self.total_live, self.total_adjust, self.total_shift = live, adjust, shift
        self.total_roles = roles
        # the maximum of h over each run of MAX_BLOCK events: a stretch is its two ends plus whole runs
        h = self.h
        self.block_max = [max(h[i:i + MAX_BLOCK]) for i in range(0, len(h), MAX_BLOCK)]

    def _roles_through(self, t: int) -> dict[str, int]:
        """Live bytes per role after event ``t`` (every gradient kept): the checkpoint before it plus at most
        ``ROLE_STRIDE`` events, instead of a copy of the totals kept for every event."""
        roles = dict(self.checkpoints[t // ROLE_STRIDE])
        for e in self.events[t - t % ROLE_STRIDE:t + 1]:
            roles[e.role] = roles.get(e.role, 0) + e.nbytes
        return roles

    def _argmax(self, lo: int, hi: int) -> int:
        """First index of the maximum of h over [lo, hi]: C-level ``max`` over the partial runs at both ends and
        over the maxima of the whole runs between them, O(MAX_BLOCK + n / MAX_BLOCK) (no O(n log n) table to build
        for the few stretches a rank asks about)."""
        h, size = self.h, MAX_BLOCK
        first, last = lo // size + 1, hi // size  # the whole runs inside: [first, last)
        if first >= last:
            part = h[lo:hi + 1]
            return lo + part.index(max(part))
        head, whole, tail = h[lo:first * size], self.block_max[first:last], h[last * size:hi + 1]
        head_top, whole_top = max(head), max(whole)
        top = max(head_top, whole_top, max(tail))
        if head_top == top:
            return lo + head.index(top)
        if whole_top == top:
            run = first + whole.index(top)
            return run * size + h[run * size:(run + 1) * size].index(top)
        return last * size + tail.index(top)

    def summary(self, owned: set[str]) -> Summary:
        n = len(self.events)
        if not n:
            return Summary()
        # where K changes: an own gradient made at q counts from q + 1 (at q, h already holds it); one
        # freed at q stops counting at q itself
        changes = sorted((t + 1 if self.events[t].nbytes > 0 else t, self.events[t].nbytes, self.events[t].nbytes < 0)
                         for name in owned for t in self.owned_events.get(name, ()))
        best, best_t, best_k, kept, lo = 0, -1, 0, 0, 0
        own_inserted = 0  # own allocations: not followed by a free; own frees: kept in the sequence
        own_before: list[tuple[int, int]] = []
        for at, nbytes, _is_free in [*changes, (n, 0, False)]:
            if lo <= at - 1:
                t = self._argmax(lo, at - 1)
                if self.h[t] + kept > best:
                    best, best_t, best_k = self.h[t] + kept, t, kept
                    own_before.append((t, own_inserted))
            kept += nbytes
            own_inserted += 1
            lo = max(lo, at)
        own_allocs = sum(1 for _at, nb, _f in changes if nb > 0)
        own_frees = len(changes) - own_allocs
        roles = dict(self.total_roles)
        roles["gradient"] = roles.get("gradient", 0) - self.total_adjust + kept
        length = n + self.total_shift - own_allocs + own_frees
        delta = self.total_live - self.total_adjust + kept
        if best_t < 0:
            return Summary(length, delta, tuple(roles.items()), 0, -1, "", (), self.events[0].phase)
        at_roles = self._roles_through(best_t)
        at_roles["gradient"] = at_roles.get("gradient", 0) - self.adjust[best_t] + best_k
        own_seen = sum(1 for at, _nb, _f in changes if at <= best_t)
        index = best_t + self.shift[best_t] - own_seen
        return Summary(length, delta, tuple(roles.items()), best, index, self.events[best_t].phase,
                       tuple(at_roles.items()), self.events[0].phase)


#: events between two kept role totals of :class:`DroppedGradients` (a summary adds up at most this many)
ROLE_STRIDE = 64
#: events per run whose maximum :class:`DroppedGradients` keeps (a stretch's maximum reads its ends and these)
MAX_BLOCK = 64


def _is_grad_event(e: Event) -> bool:
    return e.role == "gradient" and e.name.endswith(".grad") and e.nbytes != 0


def parameter_broadcasts(ctx: RankContext, strategy: str) -> CommVolume:
    """``ZeroRedundancyOptimizer.step`` ends with ``_sync_params``: for every rank, each parameter of its
    partition is broadcast from it (``parameters_as_bucket_view=False``, the default: one ``broadcast`` per
    tensor; torch 2.13 ``zero_redundancy_optimizer.py``). Every rank takes part in every broadcast, as
    root or receiver, so each hands over all trainable parameters once per step: the same on every rank.
    """
    p_b = collective_dtypes(ctx.config, strategy).parameter_bytes
    size = p_b * sum(p.numel for p in ctx.trainable)
    return CommVolume.of(ctx.world_size, {"broadcast": KindVolume(len(ctx.trainable), size, size)})
