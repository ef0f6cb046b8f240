"""Mesh coordinates of ranks: rank r of a (dp, tp) mesh sits at (r // tp, r mod tp) (``init_device_mesh``'s
row-major layout, as ``estimator.measure.tp`` builds it). 1-D layouts are (N, 1) (data parallel) or (1, t)."""

from __future__ import annotations

from typing import Any

from estimator.config import Config


def mesh_shape(config: Config, strategy: str, world_size: int) -> tuple[int, int]:
    """(dp, tp): tensor parallelism alone is (1, N); zero3/fsdp with ``parallel.tp_size`` t is (N/t, t)."""
    t = world_size if strategy == "tp" else max(1, config.parallel.tp_size)
    return world_size // t, t


def _ranges(values: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for v in sorted(set(values)):
        if out and out[-1][1] + 1 == v:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def coordinates(ranks: tuple[tuple[int, int], ...], tp: int) -> dict[str, Any]:
    """The dp and tp indices a group of ranks (inclusive ranges) covers, as inclusive ranges each."""
    dp_idx: list[int] = []
    tp_idx: list[int] = []
    for a, b in ranks:
        dp_idx += range(a // tp, b // tp + 1)
        tp_idx += range(a % tp, tp) if b - a + 1 >= tp else range(a % tp, b % tp + 1)
        if b - a + 1 >= tp:
            tp_idx += range(0, tp)
    return {"dp": _ranges(dp_idx), "tp": _ranges(tp_idx)}


def describe(shape: tuple[int, int]) -> str:
    dp, tp = shape
    return f"mesh (dp, tp) = ({dp}, {tp}): rank r is (r // {tp}, r mod {tp})"
