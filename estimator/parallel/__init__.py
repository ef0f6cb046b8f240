"""Per-rank memory of one training step under a parallel layout: DDP, ZeRO-1/2, ZeRO-3 (FSDP2).

Each strategy is one module that registers itself (``ddp.py``, ``zero.py``, ``fsdp.py``); this module
is the public entry: :func:`rank_groups` computes each distinct rank once and returns the ranks that
share it, so the cost follows the number of distinct ranks, not the world size.

``training.batch_size`` is the batch of one rank (global batch = batch_size · N): data parallelism
splits the global batch, so activations do not change.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from estimator.config import Config
from estimator.families.base import get_family
from estimator.layouts import SHARDED_STRATEGIES
from estimator.nogc import without_gc
from estimator.optimizers import get_optimizer
from estimator.parallel import ddp, fsdp, tp, zero  # noqa: F401  (registers the strategies)
from estimator.parallel.base import (
    MAX_WORLD_SIZE,
    STRATEGIES_BY_NAME,
    RankContext,
    RankEstimate,
    RankGroup,
    check_world_size,
    get_strategy,
    merge_equal,
    with_communication,
)
from estimator.parallel.ddp import ddp_bucket_bytes
from estimator.parallel.zero import zero_partition
from estimator.precision import training_plan
from estimator.simulate import state_bytes

STRATEGIES: tuple[str, ...] = tuple(n for n in ("ddp", "zero1", "zero2", "zero3", "fsdp", "tp")
                                    if n in STRATEGIES_BY_NAME)

__all__ = ["MAX_WORLD_SIZE", "STRATEGIES", "RankEstimate", "RankGroup", "ddp_bucket_bytes", "model_state_bytes",
           "per_rank_estimate", "per_rank_estimates", "rank_groups", "zero_partition"]


@without_gc
def rank_groups(config: Config, strategy: str, world_size: int, device: str = "cuda") -> list[RankGroup]:
    """The distinct ranks of ``strategy`` on ``world_size`` ranks, each computed once, with the ranks it covers.

    The same layout asked again in one process (the report and ``--gpu``'s fit, the fit's alternatives and
    its search for the smallest world size) is answered from a small cache keyed by the config's JSON:
    the result is immutable, as :func:`~estimator.simulate.simulate`'s.
    """
    chosen = tp.mesh_strategy(config, strategy) or get_strategy(strategy)
    check_world_size(world_size)
    key = (config.model_dump_json(), strategy, world_size, device)
    if key not in _GROUPS:
        ctx = _context(config, key)
        groups = merge_equal([(ranges, _rank_estimate(chosen, ctx, key, rep)) for ranges, rep in chosen.groups(ctx)])
        _remember(_GROUPS, key, groups)
    return list(_GROUPS[key])


def per_rank_estimate(
    config: Config, strategy: str, world_size: int, device: str = "cuda", rank: int = 0
) -> RankEstimate:
    """The memory of ``rank`` when the step runs data-parallel on ``world_size`` ranks with ``strategy``."""
    chosen = tp.mesh_strategy(config, strategy) or get_strategy(strategy)
    check_world_size(world_size, rank)
    key = (config.model_dump_json(), strategy, world_size, device)
    if (*key, rank) in _RANKS:
        return _RANKS[(*key, rank)]
    return _rank_estimate(chosen, _context(config, key), key, rank)


def _context(config: Config, key: tuple[str, str, int, str]) -> RankContext:
    """One context per layout in a process: what its ranks share (``RankContext.shared``) is made once, whether
    the ranks are asked for one by one (the fit asks rank 0 first) or all together."""
    if key not in _CONTEXTS:
        _remember(_CONTEXTS, key, RankContext(config, key[2], key[3]), size=16)
    return _CONTEXTS[key]


def _rank_estimate(chosen: Any, ctx: RankContext, key: tuple[str, str, int, str], rank: int) -> RankEstimate:
    """One rank's estimate with its communication, made once per (config, strategy, world size, device, rank)."""
    if (*key, rank) not in _RANKS:
        _remember(_RANKS, (*key, rank), with_communication(chosen, ctx, rank, chosen.estimate(ctx, rank)))
    return _RANKS[(*key, rank)]


_GROUPS: dict[tuple[str, str, int, str], list[RankGroup]] = {}
_RANKS: dict[tuple[str, str, int, str, int], RankEstimate] = {}
_CONTEXTS: dict[tuple[str, str, int, str], RankContext] = {}


def _remember(cache: dict[Any, Any], key: Any, value: Any, size: int = 64) -> None:
    if len(cache) >= size:
        cache.pop(next(iter(cache)))
    cache[key] = value


def clear_caches() -> None:
    """Forget every layout estimated in this process (benchmarks time a cold estimate with it)."""
    from estimator.parallel.fsdp_split import clear_shared

    _GROUPS.clear()
    _RANKS.clear()
    _CONTEXTS.clear()
    clear_shared()


def per_rank_estimates(config: Config, strategy: str, world_size: int, device: str = "cuda") -> list[RankEstimate]:
    """One :class:`RankEstimate` per rank, in rank order (each distinct rank computed once)."""
    slots: list[RankEstimate | None] = [None] * world_size
    for group in rank_groups(config, strategy, world_size, device):
        for a, b in group.ranks:
            for r in range(a, b + 1):
                slots[r] = replace(group.estimate, rank=r)
    return [s for s in slots if s is not None]


def model_state_bytes(config: Config, strategy: str, world_size: int) -> dict[str, float]:
    """The ZeRO paper's per-rank model states with an ideal Ψ/N split (section 5, Figure 1).

    With ``training.master_weights`` the fp32 master copy is in K (2 + 2 + 12 bytes per parameter for
    Adam), except under zero3/fsdp, where FSDP2's fp32 shards are the master copy (4 + 4 + 8).
    """
    plan = training_plan(config.training)
    spec = get_optimizer(config.optimizer.name)
    params = get_family(config.model.family).parameters(config.model)
    psi = sum(p.numel for p in params)
    sharded_master = plan.master and strategy in SHARDED_STRATEGIES
    master_copy = False if sharded_master else None
    k = state_bytes(spec, [p for p in params if p.trainable], config, master_copy) / max(psi, 1)
    n = world_size
    p_b, g_b = (4, 4) if sharded_master else (plan.parameter_bytes, plan.gradient_bytes)
    div = {"ddp": (1, 1, 1), "zero1": (1, 1, n), "zero2": (1, n, n), "zero3": (n, n, n), "fsdp": (n, n, n)}[strategy]
    return {"parameters": p_b * psi / div[0], "gradients": g_b * psi / div[1], "optimizer_state": k * psi / div[2]}
