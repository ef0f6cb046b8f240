"""The analytic path makes many small, acyclic objects (events, parameter tensors, summaries): Python's
cyclic collector would scan them again and again as they accumulate (its full collections grow with the
heap, which makes building a step superlinear in its size). Pausing it while an estimate is built keeps
the cost linear; reference counting still frees everything that is dropped."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def without_gc(fn: F) -> F:
    """Run ``fn`` with the cyclic garbage collector paused (re-enabled after, if it was on)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper  # type: ignore[return-value]
