"""The fast paths of event building equal the plain ones they replace, event for event.

``_Sim.events`` fills each :class:`Event`'s fields without calling its ``__init__``, and ``periodic._canonical``
finds the monotone runs and sorts them in one pass over the signatures; both must give exactly what the
plain code gives (``Event(...)`` per record; :func:`~estimator.periodic.monotone_runs` and a stable sort).
"""

from __future__ import annotations

import dataclasses

import pytest

from estimator.events import Event
from estimator.families.moe_events import _MoESim
from estimator.families.transformer_events import TensorParallel, _Sim
from estimator.loader import load_config
from estimator.periodic import _canonical, _signature, monotone_runs
from estimator.presets import model_section
from estimator.simulate import step_events, step_shape, with_layers

CASES = [
    ("llama-2-7b", ["training.precision=amp-bf16", "training.activation_checkpointing=full"]),
    ("gpt2-medium", ["training.precision=fp32"]),
    ("pythia-410m", ["training.precision=bf16", "training.master_weights=true"]),
    ("mixtral-8x7b", ["training.precision=amp-bf16"]),
    ("deepseek-v3", ["training.precision=fp32", "training.activation_checkpointing=full"]),
]


def _config(preset: str, sets: list[str], layers: int = 3):  # noqa: ANN202
    base = {"model": model_section(preset)}
    return with_layers(load_config(None, [*sets, "training.batch_size=2", "training.seq_len=32"], base=base), layers)


def _plain_canonical(events: list[Event]) -> tuple[list[Event], list[tuple[str, int, str, str]]]:
    """What ``_canonical`` did before: the runs of ``monotone_runs``, each sorted stably by signature."""
    signs = _signature(events)
    order: list[int] = []
    for start, end in monotone_runs(events):
        order += sorted(range(start, end), key=signs.__getitem__)
    return [events[i] for i in order], [signs[i] for i in order]


@pytest.mark.parametrize(("preset", "sets"), CASES)
def test_canonical_equals_runs_sorted(preset: str, sets: list[str]) -> None:
    for events in step_events(_config(preset, sets), "cuda"):
        fast, fast_signs = _canonical(events)
        plain, plain_signs = _plain_canonical(events)
        assert fast_signs == plain_signs
        assert [id(e) for e in fast] == [id(e) for e in plain]  # the same objects, in the same order


def test_canonical_pairs_and_ties() -> None:
    """Runs of two (swapped only when strictly out of order), equal signatures kept in order, zero-byte events
    and phase changes ending a run."""
    rows = [("b.1", "activation", 8, "forward"), ("a.1", "activation", 4, "forward"),
            ("x.1", "temporary", 4, "forward"), ("x.2", "temporary", 4, "forward"), ("z", "temporary", 0, "forward"),
            ("y.1", "temporary", -4, "forward"),
            ("y.0", "temporary", -4, "forward"), ("q", "temporary", 8, "loss"), ("p", "activation", 8, "loss"),
            ("w", "gradient", 2, "backward"), ("v", "activation", 2, "backward"), ("u", "activation", 1, "backward")]
    events = [Event(*row) for row in rows]
    assert _canonical(events) == _plain_canonical(events)
    assert [x.name for x in _canonical(events)[0]] == ["a.1", "b.1", "x.1", "x.2", "z", "y.1", "y.0", "p", "q",
                                                       "u", "v", "w"]
    assert _canonical([]) == ([], [])


@pytest.mark.parametrize(("preset", "sets"), CASES)
def test_sim_events_are_plain_events(preset: str, sets: list[str]) -> None:
    cfg = _config(preset, sets)
    tps = [None, TensorParallel(2, sequence=True, loss=True)] if cfg.model.family == "transformer" else [None]
    for tp in tps:
        if cfg.model.family == "transformer":
            sim = _Sim(cfg.model, cfg.training, step_shape(cfg), tp)
        else:
            sim = _MoESim(cfg.model, cfg.training, step_shape(cfg))
        sim.forward()
        sim.backward()
        events = sim.events()
        plain = [Event(t.name, t.role or ("activation" if t.ever_saved else "temporary"),
                       int(t.nbytes) if kind == "alloc" else -int(t.nbytes), phase) for kind, t, phase in sim.records]
        assert events == plain
        assert [hash(x) for x in events] == [hash(x) for x in plain]
        assert [repr(x) for x in events] == [repr(x) for x in plain]
        assert all(type(x) is Event and vars(x) == vars(y) for x, y in zip(events, plain, strict=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].nbytes = 1  # type: ignore[misc]


def test_summary_init_is_the_dataclass_one() -> None:
    """``Summary`` fills its fields in one dict: the same fields, defaults, equality, hash and frozenness."""
    from estimator.timeline import Summary

    names = [f.name for f in dataclasses.fields(Summary)]
    assert list(vars(Summary())) == names
    assert Summary() == Summary(*[f.default for f in dataclasses.fields(Summary)])
    full = Summary(5, 3, (("activation", 3),), 4, 2, "forward", (("activation", 4),), "setup")
    assert full == Summary(**dict(zip(names, vars(full).values(), strict=True)))
    assert hash(full) == hash(dataclasses.replace(full))
    assert repr(full).startswith("Summary(length=5, delta=3, roles=(('activation', 3),), rise=4, rise_index=2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.rise = 0  # type: ignore[misc]
