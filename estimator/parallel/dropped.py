"""ZeRO-2's forward/backward on one rank: every gradient it does not own is dropped as soon as it appears.

DeepSpeed's ZeRO-2 (Rajbhandari et al. 2020, section 5.2) reduces each gradient to its owner as it is
produced and frees it on every other rank. With ``h(t)`` the live bytes at event t when every gradient
not made at t has been dropped, a rank's live bytes are ``h(t) + K(t)``, K the bytes of its own
gradients live at t: a step function that changes only at its own gradients' events. Its peak is the
maximum of ``h + K`` over the stretches between those events, each a C-level maximum over two partial
runs of ``MAX_BLOCK`` events and the kept maxima of the whole runs between them (first maximum on ties).

Two ways to get ``h``, with the same summaries:

* :class:`DroppedGradients` reads it off the step's flat, named events (built at the model's size);
* :class:`DroppedProgram` reads it off the periodic program of the dropped events (``periodic.py``:
  built at a few small layer counts, the repetition checked exactly), expanded without building the
  model's events. Its canonical order sorts runs of allocations (or of frees), which changes neither a
  run's highest prefix nor where it is nor what is live there, also with a rank's own gradients kept
  (their drop removed: two runs merge). The repeated blocks keep their first copy's names, so the true
  name of each drop is read by a rule learned and checked at the small layer counts (:func:`_drop_names`).
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable, Sequence

from estimator.events import Event
from estimator.parallel.base import RankContext
from estimator.periodic import Program, Segment, _blank_numbers
from estimator.timeline import Summary

_DIGITS = re.compile(r"\d+")
#: events between two kept role totals of :class:`DroppedGradients` (a summary adds up at most this many)
ROLE_STRIDE = 64
#: events per run whose maximum is kept (a stretch's maximum reads its ends and these)
MAX_BLOCK = 64


def is_grad_event(e: Event) -> bool:
    return e.role == "gradient" and e.name.endswith(".grad") and e.nbytes != 0


class _Stretches:
    """``h`` and the maxima of its runs of ``MAX_BLOCK`` events: first maxima over stretches of it."""

    h: list[int]
    block_max: list[int]

    def _keep_maxima(self) -> None:
        h = self.h
        self.block_max = [max(h[i:i + MAX_BLOCK]) for i in range(0, len(h), MAX_BLOCK)]

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

    events: list[Event]

    def _summary(self, length: int, delta: int, roles: dict[str, int], best: int, best_t: int, index: int,
                 at_roles: dict[str, int]) -> Summary:
        """The rank's summary: no peak above its start where ``best_t`` is -1."""
        if best_t < 0:
            return Summary(length, delta, tuple(roles.items()), 0, -1, "", (), self.events[0].phase)
        return Summary(length, delta, tuple(roles.items()), best, index, self.events[best_t].phase,
                       tuple(at_roles.items()), self.events[0].phase)

    def _best(self, changes: Iterable[tuple[int, int]]) -> tuple[int, int, int, int]:
        """The highest ``h + K`` (first on ties) with K changing by each ``(index, bytes)`` of ``changes`` (sorted)
        from that index on: (its value, its index or -1, K there, K at the end)."""
        best, best_t, best_k, kept, lo = 0, -1, 0, 0, 0
        for at, nbytes in [*changes, (len(self.h), 0)]:
            if lo <= at - 1:
                t = self._argmax(lo, at - 1)
                if self.h[t] + kept > best:
                    best, best_t, best_k = self.h[t] + kept, t, kept
            kept += nbytes
            lo = max(lo, at)
        return best, best_t, best_k, kept


class DroppedGradients(_Stretches):
    """The forward/backward of a ZeRO-2 rank from the step's flat events (module docstring)."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.h = []
        self.adjust: list[int] = []  # gradient bytes h leaves out at t: allocations before t, frees up to t
        self.shift: list[int] = []  # events inserted (a dropped gradient's free) or removed before t, all dropped
        self.checkpoints: list[dict[str, int]] = []  # live bytes per role before event k * ROLE_STRIDE
        self.owned_events: dict[str, list[int]] = {}
        live = adjust = shift = 0
        roles: dict[str, int] = {}
        for t, e in enumerate(events):
            if not t % ROLE_STRIDE:
                self.checkpoints.append(dict(roles))
            grad = is_grad_event(e)
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
        self._keep_maxima()

    def _roles_through(self, t: int) -> dict[str, int]:
        """Live bytes per role after event ``t`` (every gradient kept): the checkpoint before it plus at most
        ``ROLE_STRIDE`` events, instead of a copy of the totals kept for every event."""
        return _add_roles(dict(self.checkpoints[t // ROLE_STRIDE]), self.events[t - t % ROLE_STRIDE:t + 1])

    def summary(self, owned: set[str]) -> Summary:
        n = len(self.events)
        if not n:
            return Summary()
        # where K changes: an own gradient made at q counts from q + 1 (at q, h already holds it); one
        # freed at q stops counting at q itself
        changes = sorted((t + 1 if self.events[t].nbytes > 0 else t, self.events[t].nbytes)
                         for name in owned for t in self.owned_events.get(name, ()))
        best, best_t, best_k, kept = self._best(changes)
        own_allocs = sum(1 for _at, nb in changes if nb > 0)
        own_frees = len(changes) - own_allocs
        roles = dict(self.total_roles)
        roles["gradient"] = roles.get("gradient", 0) - self.total_adjust + kept
        length = n + self.total_shift - own_allocs + own_frees
        delta = self.total_live - self.total_adjust + kept
        if best_t < 0:
            return self._summary(length, delta, roles, 0, -1, -1, {})
        at_roles = self._roles_through(best_t)
        at_roles["gradient"] = at_roles.get("gradient", 0) - self.adjust[best_t] + best_k
        own_seen = sum(1 for at, _nb in changes if at <= best_t)
        return self._summary(length, delta, roles, best, best_t, best_t + self.shift[best_t] - own_seen, at_roles)


def dropped(events: Iterable[Event]) -> list[Event]:
    """``events`` with every gradient freed right after it appears (its free inserted). Raises ValueError where a
    gradient is freed inside them: the periodic search then fails and the flat path is taken."""
    out: list[Event] = []
    for e in events:
        out.append(e)
        if is_grad_event(e):
            if e.nbytes < 0:
                raise ValueError("a gradient is freed inside the forward/backward")
            out.append(Event(e.name, e.role, -e.nbytes, e.phase))
    return out


class DroppedProgram(_Stretches):
    """The forward/backward of a ZeRO-2 rank from the periodic program of the dropped events (module docstring).

    ``program``: the dropped events at the model's size, compressed; ``drops``: the index of each drop (the
    free after a gradient appears) in the expanded program and the gradient's true name. A rank keeps its own
    gradients: their drops are removed (K rises there by the gradient's bytes).
    """

    def __init__(self, program: Program, drops: dict[str, tuple[int, int]]) -> None:
        self.drops = drops  # parameter name -> (index of its drop, its bytes)
        self.events = list(itertools.chain.from_iterable(s.events * s.count for s in program))
        self.h = list(itertools.accumulate(e.nbytes for e in self.events))
        self._keep_maxima()
        self.starts: list[int] = []  # where each segment begins in the expanded events
        self.before: list[dict[str, int]] = []  # live bytes per role before each segment
        self.program = program
        start, roles = 0, {}
        for segment in program:
            self.starts.append(start)
            self.before.append(dict(roles))
            for role, n in segment.summary.roles:
                roles[role] = roles.get(role, 0) + n
            start += segment.length
        self.total_roles = roles

    def _roles_through(self, t: int) -> dict[str, int]:
        """Live bytes per role after event ``t``: the roles before its segment, whole copies of the block, and
        the block's events up to it (O(roles + the block))."""
        s = bisect.bisect_right(self.starts, t) - 1
        segment = self.program[s]
        copies, offset = divmod(t - self.starts[s], len(segment.events))
        roles = dict(self.before[s])
        if copies:
            for role, n in _block_roles(segment):
                roles[role] = roles.get(role, 0) + n * copies
        return _add_roles(roles, segment.events[:offset + 1])

    def summary(self, owned: set[str]) -> Summary:
        n = len(self.events)
        if not n:
            return Summary()
        changes = sorted((self.drops[name][0], self.drops[name][1]) for name in owned if name in self.drops)
        best, best_t, best_k, kept = self._best(changes)
        roles = dict(self.total_roles)
        roles["gradient"] = roles.get("gradient", 0) + kept
        length, delta = n - len(changes), self.h[-1] + kept
        if best_t < 0:
            return self._summary(length, delta, roles, 0, -1, -1, {})
        at_roles = self._roles_through(best_t)
        at_roles["gradient"] = at_roles.get("gradient", 0) + best_k
        index = best_t - sum(1 for at, _nb in changes if at <= best_t)
        return self._summary(length, delta, roles, best, best_t, index, at_roles)


def _block_roles(segment: Segment) -> tuple[tuple[str, int], ...]:
    """Per role, what one copy of a repeated segment's block adds."""
    return tuple(_add_roles({}, segment.events).items())


def _add_roles(roles: dict[str, int], events: Iterable[Event]) -> dict[str, int]:
    """``roles`` with each event's bytes added to its role's (in place, returned)."""
    for e in events:
        roles[e.role] = roles.get(e.role, 0) + e.nbytes
    return roles


def drop_positions(program: Program, copies: int) -> list[tuple[int, str, int]]:
    """Where each drop lies in ``program`` expanded with ``copies`` copies of every repeated segment (a count
    above 1; the others appear once), with the drop's name as the program holds it (its first copy's) and
    the gradient's bytes."""
    out: list[tuple[int, str, int]] = []
    start = 0
    for segment in program:
        count = copies if segment.count > 1 else 1
        offsets = [(o, e.name, -e.nbytes) for o, e in enumerate(segment.events) if is_grad_event(e) and e.nbytes < 0]
        width = len(segment.events)
        for c in range(count):
            out += [(start + c * width + o, name, nbytes) for o, name, nbytes in offsets]
        start += count * width
    return out


def _numbers(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _DIGITS.findall(name))


def _drop_names(positions: Sequence[tuple[int, str, int]], universe: Iterable[str],
                signs: dict[str, tuple[int, ...]]) -> dict[int, str] | None:
    """The true name of each drop: the k-th drop of a name pattern (numbers blanked) is the k-th name of that
    pattern in ``universe`` ordered by its numbers, each ascending or descending (``signs``, per pattern).
    None where a pattern's drops and names do not pair up one to one."""
    by_pattern: dict[str, list[str]] = {}
    for name in universe:
        by_pattern.setdefault(_blank_numbers(name), []).append(name)
    slots: dict[str, list[int]] = {}
    for index, name, _nbytes in positions:
        slots.setdefault(_blank_numbers(name), []).append(index)
    if slots.keys() != by_pattern.keys() or signs.keys() != by_pattern.keys():
        return None
    out: dict[int, str] = {}
    for pattern, indices in slots.items():
        names = by_pattern[pattern]
        if len(names) != len(indices):
            return None
        sign = signs[pattern]
        ordered = sorted(names, key=lambda x: tuple(s * v for s, v in zip(sign, _numbers(x), strict=True)))
        out.update(zip(indices, ordered, strict=True))
    return out


def _learn_signs(true: dict[str, list[str]]) -> dict[str, tuple[int, ...]] | None:
    """Per name pattern, the direction of each number in the order its drops come (``true``: the names in order
    at one layer count), or None where no such order reproduces it."""
    signs: dict[str, tuple[int, ...]] = {}
    for pattern, names in true.items():
        width = len(_numbers(names[0]))
        for sign in itertools.product((1, -1), repeat=width):
            if sorted(names, key=lambda x: tuple(s * v for s, v in zip(sign, _numbers(x), strict=True))) == names:
                signs[pattern] = sign
                break
        else:
            return None
    return signs


def zero2_body(ctx: RankContext) -> DroppedGradients | DroppedProgram:
    """The dropped-gradient forward/backward every ZeRO-2 rank of ``ctx`` reads: from the periodic program where
    the model's layers repeat and the drops' names follow the rule checked at the small layer counts, else
    from the flat events (the same summaries, ``tests/test_zero2_program.py``)."""
    found = _dropped_program(ctx)
    return found if found is not None else DroppedGradients(ctx.flat_body())


def _dropped_program(ctx: RankContext) -> DroppedProgram | None:
    from estimator.families.base import get_family
    from estimator.simulate import (
        CompressedStep,
        _period,
        _periodic_lists,
        _shape_key,
        step_body_events,
        with_layers,
    )

    config = ctx.config
    if not isinstance(ctx.base, CompressedStep):
        return None  # too few layers to compress (or not periodic): the flat events are small or needed anyway
    built: dict[int, list[tuple[list[Event], list]]] = {}
    found = _periodic_lists(config, lambda c: [dropped(ctx.round(step_body_events(c)))],
                            ("zero2-dropped", _shape_key(config, ctx.device)), built)
    if found is None:
        return None
    program = found[0]
    layers, period = config.model.num_layers, _period(config)  # type: ignore[union-attr]
    copies = max((s.count for s in program if s.count > 1), default=0)
    if not copies:
        return None
    base = layers - copies * period
    family = get_family(config.model.family)
    signs: dict[str, tuple[int, ...]] | None = None
    checked = 0
    for n in sorted(k for k in built if k >= base and not (k - base) % period):
        if not built[n]:
            return None
        events, c = built[n][0][0], (n - base) // period
        if sum(len(s.events) * (c if s.count > 1 else 1) for s in program) != len(events):
            return None  # the program at this count is not that count's list
        positions = drop_positions(program, c)
        if not all(is_grad_event(events[i]) and events[i].nbytes < 0 for i, _name, _nbytes in positions):
            return None
        true = [events[i].name for i, _name, _nbytes in positions]
        if signs is None:
            by_pattern: dict[str, list[str]] = {}
            for name in true:
                by_pattern.setdefault(_blank_numbers(name), []).append(name)
            signs = _learn_signs(by_pattern)
            if signs is None:
                return None
        universe = [f"{p.name}.grad" for p in family.parameters(with_layers(config, n).model) if p.trainable]
        names = _drop_names(positions, universe, signs)
        if names is None or [names[i] for i, _name, _nbytes in positions] != true:
            return None
        checked += 1
    if checked < 2 or signs is None:
        return None
    positions = drop_positions(program, copies)
    names = _drop_names(positions, [f"{p.name}.grad" for p in ctx.trainable], signs)
    if names is None:
        return None
    return DroppedProgram(program, {names[i][:-5]: (i, nbytes) for i, _name, nbytes in positions})
