"""DDP (``DistributedDataParallel``): every rank holds every parameter, gradient and optimizer state,
plus the reducer's flat gradient buckets (Li et al. 2020, "PyTorch Distributed", section 3.2.3).

Model states per rank, Rajbhandari et al. 2020 ("ZeRO", section 5): P_b·Ψ + G_b·Ψ + S_b·Ψ. Every
rank is the same: it is computed once.
"""

from __future__ import annotations

from estimator.families.base import ParamTensor
from estimator.parallel.base import RankContext, RankEstimate, register_strategy
from estimator.parallel.comm import CommParts, CommVolume, KindVolume, collective_dtypes, empty
from estimator.parallel.replicated import ReplicatedParameters

DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel(bucket_cap_mb=None) -> 25 MiB


def ddp_bucket_bytes(params: list[ParamTensor], elem: int) -> list[int]:
    """Bytes of each DDP bucket: parameters in reverse order, a bucket closes once it reaches its cap.

    ``dist._compute_bucket_assignment_by_size`` with caps [1 MiB, 25 MiB] (the first bucket is small so
    the first all-reduce starts early; Li et al. 2020, section 3.2.3). One flat buffer per bucket, alive
    for the model's life (``gradient_as_bucket_view=False``, the default, copies each gradient into it).
    """
    buckets: list[int] = []
    current, caps = 0, [DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES]
    for p in reversed(params):
        current += p.numel * elem
        if current >= caps[min(len(buckets), 1)]:
            buckets.append(current)
            current = 0
    return buckets + ([current] if current else [])


@register_strategy
class DDP:
    name = "ddp"

    def groups(self, ctx: RankContext) -> list[tuple[tuple[tuple[int, int], ...], int]]:
        return [(((0, ctx.world_size - 1),), 0)]

    def communication(self, ctx: RankContext, rank: int) -> CommParts:
        return ctx.shared("ddp_communication", lambda: ddp_communication(ctx, self.name))

    def estimate(self, ctx: RankContext, rank: int) -> RankEstimate:
        shared = ctx.shared("replicated", lambda: ReplicatedParameters(ctx))
        grads = sum(p.numel for p in ctx.trainable) * ctx.plan.gradient_bytes
        return shared.rank(self.name, rank, ctx.trainable, buckets(ctx), grads)


def buckets(ctx: RankContext) -> list[int]:
    """The DDP buckets of this context's model, computed once."""
    return ctx.shared("ddp_buckets", lambda: ddp_bucket_bytes(ctx.trainable, ctx.plan.gradient_bytes))


def ddp_communication(ctx: RankContext, strategy: str = "ddp") -> CommParts:
    """DDP's collectives per rank (every rank alike; torch 2.13 ``reducer.cpp``; Li et al. 2020, section 3.2.3).

    Each gradient sync all-reduces every bucket in place (input = output = the bucket, in the gradients'
    dtype; buckets as :func:`ddp_bucket_bytes` cuts them). In the second forward (of the run) the reducer
    rebuilds its buckets in the order the gradients became ready and ``sync_bucket_indices`` broadcasts
    that assignment from rank 0: an int32 tensor of the bucketed parameter indices plus the bucket count
    (P + 1 elements), then the int32 bucket sizes (one per bucket). The rebuilt buckets are taken to be
    the constructor's (the gradients become ready in reverse parameter order; a model whose order
    differs across a bucket cap would all-reduce the same bytes in differently cut calls).
    Buffers (``broadcast_buffers``) would be broadcast every forward: the families have none.
    """
    n = ctx.world_size
    grad_bytes = collective_dtypes(ctx.config, strategy).gradient_bytes
    sizes = ddp_bucket_bytes(ctx.trainable, grad_bytes)
    sync = CommVolume.of(n, {"all_reduce": KindVolume(len(sizes), sum(sizes), sum(sizes))})
    rebuild = 4 * (len(ctx.trainable) + 1) + 4 * len(sizes) if sizes else 0
    second = CommVolume.of(n, {"broadcast": KindVolume(2 if sizes else 0, rebuild, rebuild)})
    return CommParts(empty(n), sync, empty(n), second)
