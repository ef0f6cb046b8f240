"""What a family derives from its model section alone, made once per model in a process.

An estimate asks a family for its parameter list many times (the totals, the FLOPs, the optimizer state,
every rank context, every alternative of a fit); a 100,000-layer transformer has 900,000 of them, and
building the list ten times was most of such an estimate. The list is keyed by the model section's JSON
(a frozen pydantic model: its JSON is its value) and each caller gets its own copy of the list (the
``ParamTensor`` values themselves are immutable named tuples).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

T = TypeVar("T")

#: models remembered per function (a fit's alternatives change the model section a few times at most)
KEEP = 16


def per_model(build: Callable[..., list[T]]) -> Callable[..., list[T]]:
    """``build(model, *args)`` made once per model section and (hashable) further arguments; a fresh list each
    call."""
    made: dict[tuple[str, tuple[Any, ...]], tuple[T, ...]] = {}

    @wraps(build)
    def cached(model: Any, *args: Any) -> list[T]:
        key = (model.model_dump_json(), args)
        if key not in made:
            if len(made) >= KEEP:
                made.pop(next(iter(made)))
            made[key] = tuple(build(model, *args))
        return list(made[key])

    _CACHES.append(made)
    return cached


_CACHES: list[dict[Any, Any]] = []


def clear_caches() -> None:
    """Forget every model's derived lists (``simulate.clear_caches``: a benchmark timing a cold estimate)."""
    for made in _CACHES:
        made.clear()
