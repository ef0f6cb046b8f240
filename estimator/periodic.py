"""Steps whose layers repeat, described once: the cost of an estimate follows distinct blocks, not layers.

A model of ``L`` identical layers produces, for every phase of the step, the same events for each
layer (only the names differ): its event list is a fixed skeleton with some blocks repeated once per
layer. Rather than materialise ``L`` copies, we build the step exactly for a few small layer counts
(``base``, ``base + 1``, ...), find where ``base + 1`` inserts blocks into ``base`` (a diff on the
events' role, size and phase), and check that inserting those blocks ``c`` times reproduces the step
of ``base + c`` layers *exactly*, for ``c`` = 0, 1 and 2. Only then the step of ``L`` layers is taken to
be the skeleton with each block repeated ``L - base`` times, and its peak is found by composing
:class:`~estimator.timeline.Summary` values in O(distinct blocks). Anything that is not periodic
(a size that depends on ``L`` other than by repetition) fails the check and the caller falls back to
the flat, materialised step; ``tests/test_periodic.py`` compares the two for many configs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from estimator.events import Event
from estimator.timeline import Summary, summarize

#: the smallest layer count the pattern is read from, and how many further counts must confirm it (one: the
#: pattern read off b and b + 1 layers must rebuild b + 2 exactly; docs/peak.md says what a second check cost)
BASE_LAYERS = 4
CHECKS = 1
#: decompositions tried per event list before giving up (the flat step is then used)
MAX_SEARCH = 2000


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
        return summarize(self.events).repeat(self.count)


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
    two different tensors of equal size apart when the diff looks for the inserted blocks). Made once per
    list built (:func:`_canonical` returns it with the sorted events), so nothing is cached per event."""
    known, blank = _BLANKED.get, _blank_new  # _blank_numbers inlined: one dict lookup per event
    return [(e.role, e.nbytes, e.phase, known(e.name) or blank(e.name)) for e in events]


def _blank_numbers(name: str) -> str:
    """``name`` with every run of digits replaced by ``#`` (remembered: the same names come back at every layer
    count and in every search)."""
    return _BLANKED.get(name) or _blank_new(name)


_BLANKED: dict[str, str] = {}  # names blanked, at most 65,536 (emptied when full)


def _blank_new(name: str) -> str:
    if len(_BLANKED) >= 65536:
        _BLANKED.clear()
    blanked = _BLANKED[name] = _DIGITS.sub("#", name)
    return blanked


def _inserts(a: Sequence[Event], b: Sequence[Event], sa: list[tuple[str, int, str, str]] | None = None,
             sb: list[tuple[str, int, str, str]] | None = None,
             ) -> Iterator[list[tuple[int, int, tuple[Event, ...]]]]:
    """Ways ``b`` is ``a`` with runs of events inserted (positions in ``a``), most plausible first.

    Walking both lists, at each point where they part, ``b`` must hold one more copy of a block that
    repeats: the m events ``b`` inserts there equal the m events just before (a square), so the
    candidates are those m, smallest first; the total inserted is ``len(b) - len(a)``.
    """
    sa = _signature(a) if sa is None else sa  # the signatures, when the caller has them already
    sb = _signature(b) if sb is None else sb
    budget = len(sb) - len(sa)
    if budget <= 0:
        return
    tries = [0]

    def search(i: int, j: int, left: int, found: list[tuple[int, int, tuple[Event, ...]]]
               ) -> Iterator[list[tuple[int, int, tuple[Event, ...]]]]:
        tries[0] += 1
        if tries[0] > MAX_SEARCH:
            return
        same = _agreement(sa, i, sb, j)
        i, j = i + same, j + same
        if i == len(sa):
            if len(sb) - j == left:
                yield found + ([(i, j, tuple(b[j:]))] if left else [])
            return
        # first and last elements before whole slices: most m fail at once, and a block may be thousands long
        head = sb[j] if j < len(sb) else None
        squares = [m for m in range(1, min(left, j, len(sb) - j) + 1)
                   if sb[j - m] == head and sb[j - 1] == sb[j + m - 1] and sb[j - m:j] == sb[j:j + m]]
        # the block that lets the two lists agree longest afterwards first (a whole layer, not a piece of one)
        for m in sorted(squares, key=lambda m: (-_agreement(sa, i, sb, j + m), m)):
            yield from search(i, j + m, left - m, [*found, (i, j, tuple(b[j:j + m]))])

    yield from search(0, 0, budget, [])


def canonical(events: Sequence[Event]) -> list[Event]:
    """The events with each run of allocations (or of frees) in one phase sorted by signature.

    Within such a run live bytes only rise (or only fall), so its order changes neither the peak, nor
    where it is (the run's last allocation, or before a run of frees), nor what is live there; but
    some runs come in an order that is not periodic in the layer count (autocast's cache of 16-bit
    copies is released in the order of a hash table), and sorting them makes the step periodic again.
    """
    return _canonical(events)[0]


def _canonical(events: Sequence[Event]) -> tuple[list[Event], list[tuple[str, int, str, str]]]:
    """:func:`canonical`, with the signature of what it returns (each event signed once).

    The runs of :func:`monotone_runs` are read off the signatures (which hold each event's size and phase), and
    each is sorted: a pair, most runs, by one comparison."""
    signs = _signature(events)
    order: list[int] = []
    append = order.append
    for start, end in _runs([s[1] for s in signs], [s[2] for s in signs]):
        if end - start == 1:
            append(start)
        elif end - start == 2:  # a pair (most runs): swapped only when strictly out of order, as a stable sort
            if signs[start + 1] < signs[start]:
                append(start + 1)
                append(start)
            else:
                append(start)
                append(start + 1)
        else:
            order += sorted(range(start, end), key=signs.__getitem__)  # stable: as sorting the events by signature
    return [events[i] for i in order], [signs[i] for i in order]


def monotone_runs(events: Sequence[Event]) -> Iterator[tuple[int, int]]:
    """``[start, end)`` of each run of allocations (or of frees) in one phase, and of each other event alone.

    Within such a run live bytes only rise (or only fall): its order changes neither what it adds, nor its
    highest prefix sum, nor what is live there (:func:`canonical`, ``affine_batch``)."""
    return _runs([e.nbytes for e in events], [e.phase for e in events])


def _runs(sizes: list[int], phases: list[str]) -> Iterator[tuple[int, int]]:
    """:func:`monotone_runs` of the events of these sizes and phases."""
    start, n = 0, len(sizes)
    while start < n:
        size, phase = sizes[start], phases[start]
        end = start + 1
        if size:
            rising = size > 0
            while end < n and phases[end] == phase and sizes[end] and (sizes[end] > 0) == rising:
                end += 1
        yield start, end
        start = end


def _agreement(sa: list[tuple[str, int, str, str]], i: int, sb: list[tuple[str, int, str, str]], j: int) -> int:
    """How many signatures agree from ``sa[i]`` and ``sb[j]`` on (compared a slice at a time, then one by one in
    the slice where they part)."""
    limit = min(len(sa) - i, len(sb) - j)
    n, width = 0, 16
    while n < limit:
        k = min(width, limit - n)
        if sa[i + n:i + n + k] != sb[j + n:j + n + k]:
            while sa[i + n] == sb[j + n]:
                n += 1
            return n
        n += k
        width *= 2
    return n


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


def _expanded_signature(sa: list[tuple[str, int, str, str]], sb: list[tuple[str, int, str, str]],
                        places: list[tuple[int, int, int]], copies: int) -> list[tuple[str, int, str, str]]:
    """The signature of ``_expand(a, blocks, copies)`` from those of ``a`` and ``b`` (``places``: each block
    ``b[j:j + m]`` inserted before ``a[i]``), without going over the events again."""
    out: list[tuple[str, int, str, str]] = []
    start = 0
    for i, j, m in places:
        out += sa[start:i]
        if copies > 0:
            out += sb[j:j + m] * copies
        start = i
    out += sa[start:]
    return out


def periodic_programs(
    build: Callable[[int], Sequence[Sequence[Event]]], layers: int, base: int = BASE_LAYERS, checks: int = CHECKS,
    shape_key: Hashable | None = None, period: int = 1, built: dict[int, Any] | None = None,
) -> tuple[Program, ...] | None:
    """The event lists ``build(layers)`` would return, as programs, read off small layer counts.

    ``build(n)`` gives the event lists (e.g. setup, first step, steady step) of the model with ``n``
    layers. None when ``layers`` is too small to gain anything or the lists are not periodic in the
    layer count (the caller then builds them flat). ``period``: how many layers make one repeated
    block (an MoE layer every second layer: 2); the counts built are ``base + c·period``.

    ``shape_key`` names a model whose events keep their order and names when only sizes change (the
    same config at another batch size): where the blocks were found for it once, the next call builds
    two small layer counts, checks that every event's name, role and phase are where they were, and
    takes the blocks from the same places, skipping the search and the further checks.

    ``built``: the canonical lists already made per layer count, shared by calls that try several bases.
    """
    return _periodic(build, layers, base, checks, shape_key, period, {} if built is None else built)


def _periodic(build: Callable[[int], Sequence[Sequence[Event]]], layers: int, base: int, checks: int,
              shape_key: Hashable | None, period: int, built: dict[int, Any]) -> tuple[Program, ...] | None:
    if (layers - base) % period:  # start where a whole number of periods remains
        base += (layers - base) % period
    if layers <= base + (checks + 1) * period:
        return None
    copies = (layers - base) // period
    known = _SHAPES.get(shape_key) if shape_key is not None else None

    def signed(c: int) -> list[tuple[list[Event], list[tuple[str, int, str, str]]]]:
        """The canonical lists of ``base + c·period`` layers and their signatures, built when first asked
        for: the layer counts that check a pattern are built only once there is a pattern to check."""
        n = base + c * period
        if n not in built:
            built[n] = [_canonical(events) for events in build(n)]
        return built[n]

    try:
        runs = [[events for events, _signs in signed(c)] for c in (0, 1)]
        if known is not None:
            skeletons, places = known
            if [[_skeleton(signs) for _events, signs in signed(c)] for c in (0, 1)] == skeletons:
                return tuple(_expand(runs[0][w], [(i, tuple(runs[1][w][j:j + m])) for i, j, m in places[w]],
                                     copies) for w in range(len(places)))
        programs: list[Program] = []
        found: list[list[tuple[int, int, int]]] = []
        if len(runs[1]) != len(runs[0]):
            return None
        for which in range(len(runs[0])):
            lists = [run[which] for run in runs]
            signs = [signed(c)[which][1] for c in (0, 1)]
            for inserts in _inserts(lists[0], lists[1], signs[0], signs[1]):
                blocks = [(i, block) for i, _j, block in inserts]
                places = [(i, j, len(block)) for i, j, block in inserts]
                if all(len(signed(c)) == len(runs[0]) and
                       _expanded_signature(signs[0], signs[1], places, c) == signed(c)[which][1]
                       for c in range(2, checks + 2)):
                    programs.append(_expand(lists[0], blocks, copies))
                    found.append(places)
                    break
            else:
                return None
    except ValueError:
        return None
    if shape_key is not None:
        if len(_SHAPES) >= 256:
            _SHAPES.clear()
        _SHAPES[shape_key] = ([[_skeleton(signs) for _events, signs in signed(c)] for c in (0, 1)], found)
    return tuple(programs)


_SHAPES: dict[Hashable, tuple[list[list[list[tuple[str, str, str]]]], list[list[tuple[int, int, int]]]]] = {}


def _skeleton(signs: list[tuple[str, int, str, str]]) -> list[tuple[str, str, str]]:
    """Role, phase and name (numbers blanked) of each event, from its signature: what must stay in place when
    only sizes change."""
    return [(role, phase, name) for role, _nbytes, phase, name in signs]
