"""DDP (``DistributedDataParallel``): every rank holds every parameter, gradient and optimizer state,
plus the reducer's flat gradient buckets (Li et al. 2020, "PyTorch Distributed", section 3.2.3).

Model states per rank, Rajbhandari et al. 2020 ("ZeRO", section 5): P_b·Ψ + G_b·Ψ + S_b·Ψ. Every
rank is the same: it is computed once.
"""

from __future__ import annotations

from estimator.families.base import ParamTensor
from estimator.parallel.base import RankContext, RankEstimate, register_strategy
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

    def estimate(self, ctx: RankContext, rank: int) -> RankEstimate:
        shared = ctx.shared("replicated", lambda: ReplicatedParameters(ctx))
        grads = sum(p.numel for p in ctx.trainable) * ctx.plan.gradient_bytes
        return shared.rank(self.name, rank, ctx.trainable, buckets(ctx), grads)


def buckets(ctx: RankContext) -> list[int]:
    """The DDP buckets of this context's model, computed once."""
    return ctx.shared("ddp_buckets", lambda: ddp_bucket_bytes(ctx.trainable, ctx.plan.gradient_bytes))
