"""Tensor events -> live bytes over the step -> the peak, and the seed's sum by role.

Pure arithmetic over a list of :class:`~estimator.events.Event`; the same functions serve the
analytic estimate, a meta-device trace and a real measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.events import PHASES, Event


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
    by_role: dict[str, int]  # what was live at that moment


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
    totals: dict[str, int] = {}
    for tensor in live.values():
        totals[tensor.role] = totals.get(tensor.role, 0) + tensor.nbytes
    return totals


def find_peak(events: list[Event], live: dict[str, LiveTensor] | None = None) -> Peak:
    """The highest live-bytes point while ``events`` run on top of ``live``."""
    state = dict(live or {})
    current = live_bytes(state)
    best = Peak(current, events[0].phase if events else "setup", -1, by_role(state))
    for index, event in enumerate(events):
        _apply(state, event)
        current += event.nbytes
        if current > best.bytes:
            best = Peak(current, event.phase, index, by_role(state))
    return best


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
