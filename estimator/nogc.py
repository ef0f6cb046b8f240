"""The analytic path makes many small, acyclic objects (events, parameter tensors, summaries): Python's
cyclic collector would scan them again and again as they accumulate (its full collections grow with the
heap, which makes building a step superlinear in its size). Pausing it while an estimate is built keeps
the cost linear; reference counting still frees everything that is dropped."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the duration (re-enabled after, if it was on)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def without_gc(fn: F) -> F:
    """Run ``fn`` with the cyclic garbage collector paused (:func:`gc_paused`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with gc_paused():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
