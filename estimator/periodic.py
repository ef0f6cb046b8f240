"""Steps whose layers repeat, described once: the cost of an estimate follows distinct blocks, not layers.

A model of ``L`` identical layers produces, for every phase of the step, the same events for each
layer (only the names differ): its event list is a fixed skeleton with some blocks repeated once per
layer. Rather than materialise ``L`` copies, we build the step exactly for a few small layer counts
(``base``, ``base + 1``, ...), find where ``base + 1`` inserts blocks into ``base`` (a diff on the
events' role, size and phase), and check that inserting those blocks ``c`` times reproduces the step
of ``base + c`` layers *exactly*, for several ``c``. Only then the step of ``L`` layers is taken to
be the skeleton with each block repeated ``L - base`` times, and its peak is found by composing
:class:`~estimator.timeline.Summary` values in O(distinct blocks). Anything that is not periodic
(a size that depends on ``L`` other than by repetition) fails the check and the caller falls back to
the flat, materialised step; ``tests/test_periodic.py`` compares the two for many configs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import cached_property, lru_cache

from estimator.events import Event
from estimator.timeline import Summary, summarize

#: the smallest layer count the pattern is read from, and how many further counts must confirm it
BASE_LAYERS = 3
CHECKS = 2


@dataclass(frozen=True)
class Segment:
    """``count`` copies in a row of ``events`` (only the first copy's names are kept)."""

    events: tuple[Event, ...]
    count: int = 1

    @property
    def length(self) -> int:
        return len(self.events) * self.count

    @cached_property
    def summary(self) -> Summary:
        """Summarised once per segment object: a segment shared by many ranks is summarised once."""
        return summarize(list(self.events)).repeat(self.count)


Program = tuple[Segment, ...]


def summary_of(program: Sequence[Segment]) -> Summary:
    """The timeline summary of a program, in O(distinct events)."""
    total = Summary()
    for segment in program:
        total = total.then(segment.summary)
    return total


def keep_events(program: Sequence[Segment], keep: Callable[[Event], bool]) -> Program:
    """The program of the events ``keep`` selects, in order (filtering each copy = filtering the block)."""
    out: list[Segment] = []
    for segment in program:
        events = tuple(e for e in segment.events if keep(e))
        if events:
            out.append(segment if len(events) == len(segment.events) else Segment(events, segment.count))
    return tuple(out)


def map_events(program: Sequence[Segment], fn: Callable[[list[Event]], list[Event]]) -> Program:
    """Each block's events passed through ``fn`` (e.g. CUDA's block rounding)."""
    return tuple(Segment(tuple(fn(list(s.events))), s.count) for s in program)


def program_length(program: Sequence[Segment]) -> int:
    return sum(s.length for s in program)


def role_bytes(program: Sequence[Segment], keep: Callable[[Event], bool]) -> int:
    """Sum of ``nbytes`` over the (expanded) events that ``keep`` selects."""
    return sum(e.nbytes * s.count for s in program for e in s.events if keep(e))


_DIGITS = re.compile(r"\d+")


def _signature(events: Sequence[Event]) -> list[tuple[str, int, str, str]]:
    """What must repeat: role, size and phase, and the name with its layer numbers blanked out (which keeps
    two different tensors of equal size apart when the diff looks for the inserted blocks)."""
    return [_sign(e) for e in events]


def _sign(e: Event) -> tuple[str, int, str, str]:
    return e.role, e.nbytes, e.phase, _blank_numbers(e.name)


@lru_cache(maxsize=65536)
def _blank_numbers(name: str) -> str:
    return _DIGITS.sub("#", name)


def _inserts(a: Sequence[Event], b: Sequence[Event]) -> list[tuple[int, tuple[Event, ...]]] | None:
    """Where ``b`` inserts runs of events into ``a`` (positions in ``a``), or None if it changes anything else."""
    sig_a = _signature(a)
    matcher = SequenceMatcher(None, sig_a, _signature(b), autojunk=False)
    found: list[tuple[int, tuple[Event, ...]]] = []
    for tag, i1, _i2, j1, j2 in matcher.get_opcodes():
        if tag == "insert":
            found.append(_leftmost(a, sig_a, i1, tuple(b[j1:j2]), found[-1][0] if found else 0))
        elif tag != "equal":
            return None
    return found


def _leftmost(a: Sequence[Event], sig_a: list[tuple[str, int, str, str]], at: int, block: tuple[Event, ...],
              floor: int) -> tuple[int, tuple[Event, ...]]:
    """The same insertion slid as far left as it goes: a block inserted inside a run of copies of itself
    is ambiguous, and the canonical place, the start of the run, is where every further copy goes too."""
    while at > floor and sig_a[at - 1] == _sign(block[-1]):
        block = (a[at - 1], *block[:-1])
        at -= 1
    return at, block


def _expand(base: Sequence[Event], inserts: list[tuple[int, tuple[Event, ...]]], copies: int) -> Program:
    segments: list[Segment] = []
    start = 0
    for position, block in inserts:
        if position > start:
            segments.append(Segment(tuple(base[start:position])))
        if copies > 0:
            segments.append(Segment(block, copies))
        start = position
    if start < len(base):
        segments.append(Segment(tuple(base[start:])))
    return tuple(segments)


def _expanded_signature(program: Program) -> list[tuple[str, int, str, str]]:
    out: list[tuple[str, int, str, str]] = []
    for segment in program:
        out += _signature(segment.events) * segment.count
    return out


def periodic_programs(
    build: Callable[[int], Sequence[Sequence[Event]]], layers: int, base: int = BASE_LAYERS, checks: int = CHECKS
) -> tuple[Program, ...] | None:
    """The event lists ``build(layers)`` would return, as programs, read off small layer counts.

    ``build(n)`` gives the event lists (e.g. setup, first step, steady step) of the model with ``n``
    layers. None when ``layers`` is too small to gain anything or the lists are not periodic in the
    layer count (the caller then builds them flat).
    """
    if layers <= base + checks + 1:
        return None
    try:
        runs = [build(base + c) for c in range(checks + 2)]
    except ValueError:
        return None
    programs: list[Program] = []
    for which in range(len(runs[0])):
        lists = [run[which] for run in runs]
        inserts = _inserts(lists[0], lists[1])
        if inserts is None:
            return None
        for c in range(2, checks + 2):
            if _expanded_signature(_expand(lists[0], inserts, c)) != _signature(lists[c]):
                return None
        programs.append(_expand(lists[0], inserts, layers - base))
    return tuple(programs)
