"""Tensor events -> live bytes over the step -> the peak, and the seed's sum by role.

Pure arithmetic over a list of :class:`~estimator.events.Event`; the same functions serve the
analytic estimate, a meta-device trace and a real measurement.

Every function here is one pass over the events, O(events): live bytes and the per-role totals are
kept as running sums, and the by-role breakdown is copied (a handful of roles) only when a new
maximum appears. ``tests/test_timeline_property.py`` checks this against a naive replay that
recomputes everything from the live set after each event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from estimator.events import PHASES, ROLES, Event


@dataclass(frozen=True)
class LiveTensor:
    role: str
    nbytes: int


@dataclass(frozen=True)
class Peak:
    """The maximum of live bytes over a run of events, and where it happened."""

    bytes: int
    phase: str
    index: int  # index of the event right after which live bytes peaked (-1: at the start)
    by_role: dict[str, int]  # what was live at that moment (roles with live tensors, in ROLES order)


def replay(events: list[Event], live: dict[str, LiveTensor] | None = None) -> dict[str, LiveTensor]:
    """Apply events to a live set (a copy); returns the tensors still live at the end."""
    state = dict(live or {})
    for event in events:
        _apply(state, event)
    return state


def _apply(state: dict[str, LiveTensor], event: Event) -> None:
    if event.nbytes > 0:
        if event.name in state:
            raise ValueError(f"tensor {event.name!r} allocated twice")
        state[event.name] = LiveTensor(event.role, event.nbytes)
    elif event.nbytes < 0:
        if event.name not in state:
            raise ValueError(f"tensor {event.name!r} freed but not live")
        del state[event.name]


def live_bytes(live: dict[str, LiveTensor]) -> int:
    return sum(t.nbytes for t in live.values())


def by_role(live: dict[str, LiveTensor]) -> dict[str, int]:
    """Live bytes per role, for the roles that have a live tensor, in ``ROLES`` order."""
    totals: dict[str, int] = {}
    for tensor in live.values():
        totals[tensor.role] = totals.get(tensor.role, 0) + tensor.nbytes
    return _ordered(totals)


def _ordered(totals: dict[str, int]) -> dict[str, int]:
    known = {role: totals[role] for role in ROLES if totals.get(role)}
    return known | {role: n for role, n in totals.items() if role not in known and n}


def find_peak(events: list[Event], live: dict[str, LiveTensor] | None = None) -> Peak:
    """The highest live-bytes point while ``events`` run on top of ``live`` (the first, on ties). O(events)."""
    return scan(events, live)[0]


def scan(events: list[Event], live: dict[str, LiveTensor] | None = None) -> tuple[Peak, dict[str, LiveTensor]]:
    """One pass: the peak of ``events`` on top of ``live``, and the live set they leave behind."""
    state = dict(live or {})
    totals = by_role(state)
    current = sum(totals.values())
    best = Peak(current, events[0].phase if events else "setup", -1, dict(totals))
    for index, event in enumerate(events):
        _apply(state, event)
        if not event.nbytes:
            continue
        current += event.nbytes
        totals[event.role] = totals.get(event.role, 0) + event.nbytes
        if current > best.bytes:
            best = Peak(current, event.phase, index, _ordered(totals))
    return best, state


@dataclass(frozen=True, init=False)
class Summary:
    """What a run of events does to live bytes, whatever was live before it (a monoid under ``then``).

    ``rise`` is the highest prefix sum over the run's events (first one on ties) and ``rise_roles``
    the per-role change at that point; a run with ``rise <= 0`` never lifts the live bytes above
    where it started. Two summaries compose in O(roles), and ``repeat(k)`` summarises k copies in
    O(roles): that is how a step whose layers repeat costs the number of distinct blocks, not layers.
    """

    length: int = 0
    delta: int = 0
    roles: tuple[tuple[str, int], ...] = ()
    rise: int = 0
    rise_index: int = -1  # -1: no event lifts the start
    rise_phase: str = ""
    rise_roles: tuple[tuple[str, int], ...] = ()
    first_phase: str = ""

    def __init__(self, length: int = 0, delta: int = 0, roles: tuple[tuple[str, int], ...] = (), rise: int = 0,
                 rise_index: int = -1, rise_phase: str = "", rise_roles: tuple[tuple[str, int], ...] = (),
                 first_phase: str = "") -> None:
        # the frozen dataclass's own __init__ (one object.__setattr__ per field) in one dict: an estimate composes
        # thousands of summaries
        fields = self.__dict__
        fields["length"], fields["delta"], fields["roles"], fields["rise"] = length, delta, roles, rise
        fields["rise_index"], fields["rise_phase"], fields["rise_roles"] = rise_index, rise_phase, rise_roles
        fields["first_phase"] = first_phase

    def then(self, other: Summary) -> Summary:
        """This run followed by ``other``."""
        if not other.length:
            return self
        if not self.length:
            return other
        rise, index, phase, roles = self.rise, self.rise_index, self.rise_phase, self.rise_roles
        if other.rise_index >= 0 and self.delta + other.rise > (rise if index >= 0 else 0):
            rise, index, phase = self.delta + other.rise, self.length + other.rise_index, other.rise_phase
            roles = _add(self.roles, other.rise_roles)
        return Summary(self.length + other.length, self.delta + other.delta, _add(self.roles, other.roles),
                       rise, index, phase, roles, self.first_phase)

    def repeat(self, count: int) -> Summary:
        """``count`` copies in a row: the copy whose peak is highest is the last if each copy grows, else the first."""
        if count <= 0 or not self.length:
            return Summary()
        last = count - 1 if self.delta > 0 else 0
        index = self.rise_index + last * self.length if self.rise_index >= 0 else -1
        return Summary(self.length * count, self.delta * count, _scale(self.roles, count),
                       self.rise + last * self.delta, index, self.rise_phase,
                       _add(self.rise_roles, _scale(self.roles, last)), self.first_phase)


def _add(a: tuple[tuple[str, int], ...], b: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    totals = dict(a)
    for role, n in b:
        totals[role] = totals.get(role, 0) + n
    return tuple(totals.items())


def _scale(a: tuple[tuple[str, int], ...], k: int) -> tuple[tuple[str, int], ...]:
    return tuple((role, n * k) for role, n in a)


def summarize(events: Sequence[Event]) -> Summary:
    """The :class:`Summary` of a run of events, in one pass (names are not checked: the start is abstract)."""
    current, best, best_index, best_phase = 0, 0, -1, ""
    totals: dict[str, int] = {}
    get = totals.get
    for index, event in enumerate(events):
        nbytes = event.nbytes
        if not nbytes:
            continue
        current += nbytes
        role = event.role
        totals[role] = get(role, 0) + nbytes
        if current > best:
            best, best_index, best_phase = current, index, event.phase
    roles: dict[str, int] = {}
    if best_index >= 0:
        get = roles.get
        for event in events[: best_index + 1]:
            role = event.role
            roles[role] = get(role, 0) + event.nbytes
    return Summary(len(events), current, tuple(totals.items()), best, best_index,
                   best_phase, tuple(roles.items()), events[0].phase if events else "")


def peak_of(summary: Summary, live: dict[str, int], first_phase: str | None = None) -> Peak:
    """The :class:`Peak` of a summarised run on top of live bytes ``live`` (per role; roles at 0 are left out)."""
    start = sum(live.values())
    phase = first_phase or summary.first_phase or "setup"
    if summary.rise_index < 0 or summary.rise <= 0:
        return Peak(start, phase, -1, _ordered(live))
    return Peak(start + summary.rise, summary.rise_phase, summary.rise_index,
                _ordered(dict(_add(tuple(live.items()), summary.rise_roles))))


def curve(events: list[Event], live: dict[str, LiveTensor] | None = None) -> list[tuple[str, int]]:
    """Live bytes after each event, labelled with its phase (the first point is the start)."""
    state = dict(live or {})
    current = live_bytes(state)
    points = [(events[0].phase if events else "setup", current)]
    for event in events:
        _apply(state, event)
        current += event.nbytes
        points.append((event.phase, current))
    return points


def phase_peaks(points: list[tuple[str, int]]) -> dict[str, int]:
    """The highest live bytes within each phase, in phase order."""
    peaks: dict[str, int] = {}
    for phase, value in points:
        peaks[phase] = max(peaks.get(phase, 0), value)
    return {p: peaks[p] for p in PHASES if p in peaks}
