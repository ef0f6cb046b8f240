"""Shortcuts of the simulation give the slow path's events: the steady step's body built without the
optimizer's events (what ZeRO-2 edits by name), and the family's forward-backward events kept per process."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.simulate import OUTSIDE_BODY, CompressedStep, simulate, step_body_events, step_events

TINY = {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 32, "max_seq_len": 8}


def _moe():  # noqa: ANN202
    from tests.moe.conftest import SMALL

    return {"family": "moe", **SMALL["mixtral"]}


@pytest.mark.parametrize(("model", "extra"), [
    (None, ["model.num_layers=3", "optimizer.name=adagrad"]),
    (None, ["model.num_layers=20", "optimizer.name=adam", "training.precision=bf16", "training.master_weights=true"]),
    (TINY, ["model.num_layers=18", "optimizer.name=adamw", "training.precision=amp-bf16"]),
    (TINY, ["model.num_layers=17", "optimizer.name=lion", "training.grad_accum_steps=3",
            "training.activation_checkpointing=full"]),
    (TINY, ["model.num_layers=4", "optimizer.name=adafactor", "training.precision=bf16",
            "training.master_weights=true", "training.grad_accum_steps=2"]),
    ("moe", ["model.num_layers=17", "optimizer.name=adam8bit"]),
])
def test_body_alone_equals_the_filtered_steady_step(model: dict | str | None, extra: list[str]) -> None:
    base = {"model": _moe() if model == "moe" else model} if model else None
    overrides = ["training.seq_len=8", *extra] if model else extra
    cfg = load_config(None, overrides, base=base)
    for device in ("cpu", "cuda"):
        steady = step_events(cfg, device, rounded=False)[2]
        assert step_body_events(cfg) == [e for e in steady if e.phase not in OUTSIDE_BODY], device
        step = simulate(cfg, device)
        want = [e for e in step_events(cfg, device)[2] if e.phase not in OUTSIDE_BODY]
        assert step.body_events() == want, device
        if isinstance(step, CompressedStep):  # after the flat lists are built, the same again
            assert step.steady_step and step.body_events() == want, device
