"""The one-pass timeline against a naive replay that recomputes everything after each event."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.events import PHASES, ROLES, Event
from estimator.timeline import LiveTensor, by_role, find_peak, replay, scan


def naive_peak(events: list[Event], live: dict[str, LiveTensor]) -> tuple[int, str, int, dict[str, int]]:
    """Replay event by event and recompute live bytes and the by-role sums from scratch each time."""
    state = dict(live)
    best = (sum(t.nbytes for t in state.values()), events[0].phase if events else "setup", -1, by_role(state))
    for index, event in enumerate(events):
        state = replay([event], state)
        total = sum(t.nbytes for t in state.values())
        if total > best[0]:
            best = (total, event.phase, index, by_role(state))
    return best


@st.composite
def event_lists(draw: st.DrawFn) -> tuple[list[Event], dict[str, LiveTensor]]:
    """Valid sequences: frees only of live tensors, sizes that tie often (small alphabet)."""
    names = [f"t{i}" for i in range(draw(st.integers(0, 12)))]
    live: dict[str, LiveTensor] = {}
    for name in draw(st.lists(st.sampled_from(names), unique=True)) if names else []:
        live[name] = LiveTensor(draw(st.sampled_from(ROLES)), draw(st.sampled_from([1, 2, 4, 512])))
    events: list[Event] = []
    current = dict(live)
    for _ in range(draw(st.integers(0, 40))):
        phase = draw(st.sampled_from(PHASES))
        free_one = current and draw(st.booleans())
        if free_one:
            name = draw(st.sampled_from(sorted(current)))
            tensor = current.pop(name)
            events.append(Event(name, tensor.role, -tensor.nbytes, phase))
        else:
            name = f"n{len(events)}"
            role, size = draw(st.sampled_from(ROLES)), draw(st.sampled_from([1, 2, 4, 512]))
            current[name] = LiveTensor(role, size)
            events.append(Event(name, role, size, phase))
    return events, live


@settings(max_examples=300, deadline=None)
@given(event_lists())
def test_fast_peak_equals_naive_replay(case: tuple[list[Event], dict[str, LiveTensor]]) -> None:
    events, live = case
    peak, end = scan(events, live)
    assert (peak.bytes, peak.phase, peak.index, peak.by_role) == naive_peak(events, live)
    assert end == replay(events, live)
    assert find_peak(events, live) == peak


def test_empty_list_peaks_at_the_start() -> None:
    live = {"w": LiveTensor("parameter", 144)}
    peak = find_peak([], live)
    assert (peak.bytes, peak.phase, peak.index, peak.by_role) == (144, "setup", -1, {"parameter": 144})


def test_ties_keep_the_first_maximum() -> None:
    events = [Event("a", "activation", 8, "forward"), Event("a", "activation", -8, "forward"),
              Event("b", "temporary", 8, "backward")]
    peak = find_peak(events)
    assert (peak.bytes, peak.index, peak.phase) == (8, 0, "forward")


def test_free_of_unknown_tensor_is_refused_like_the_replay() -> None:
    events = [Event("ghost", "activation", -8, "forward")]
    with pytest.raises(ValueError, match="freed but not live"):
        find_peak(events)
    with pytest.raises(ValueError, match="freed but not live"):
        replay(events)


def test_double_allocation_is_refused() -> None:
    events = [Event("a", "activation", 8, "forward"), Event("a", "activation", 8, "forward")]
    with pytest.raises(ValueError, match="allocated twice"):
        find_peak(events)
