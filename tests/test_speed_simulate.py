"""Shortcuts of the simulation give the slow path's events: the steady step's body built without the
optimizer's events (what ZeRO-2 edits by name), and the family's forward-backward events kept per process."""

from __future__ import annotations

import pytest

from estimator import load_config
from estimator.simulate import (
    OUTSIDE_BODY,
    CompressedStep,
    simulate,
    step_body_events,
    step_events,
    step_tail_events,
    unrounded_step,
)

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
        # zero_grad's events alone: the same in the first and a steady step
        for flat in step_events(cfg, device, rounded=False)[1:]:
            assert step_tail_events(cfg) == [e for e in flat if e.phase == "zero_grad"], device
        step = simulate(cfg, device)
        want = [e for e in step_events(cfg, device)[2] if e.phase not in OUTSIDE_BODY]
        assert step.body_events() == want, device
        if isinstance(step, CompressedStep):  # after the flat lists are built, the same again
            assert step.steady_step and step.body_events() == want, device


@pytest.mark.parametrize("extra", [
    ["optimizer.name=adamw", "training.precision=amp-bf16"],
    ["optimizer.name=adam", "training.precision=bf16", "training.master_weights=true", "training.grad_accum_steps=2"],
    ["optimizer.name=adagrad", "optimizer.implementation=for-loop"],
])
def test_unrounded_cuda_step_equals_the_cpu_step_outside_the_optimizer(extra: list[str]) -> None:
    """What a CUDA rank context reads off the estimate's unrounded programs (setup less the optimizer's
    state, forward/backward, zero_grad, the saved bytes) is the CPU step's, which it used to simulate."""
    from estimator.parallel.base import RankContext
    from estimator.timeline import summarize

    cfg = load_config(None, ["training.seq_len=8", "model.num_layers=18", *extra], base={"model": TINY})
    view, cpu = unrounded_step(cfg), simulate(cfg, "cpu")
    assert isinstance(view, CompressedStep) and view is not cpu
    ctx = RankContext(cfg, 2, "cuda")
    assert ctx.base is view
    assert view.saved_activation_bytes == cpu.saved_activation_bytes
    assert view.body_events() == cpu.body_events()

    def flat(program, keep=lambda e: True):  # noqa: ANN001, ANN202
        return [e for segment in program for _ in range(segment.count) for e in segment.events if keep(e)]

    not_state = lambda e: e.role != "optimizer_state"  # noqa: E731
    assert summarize(flat(view.programs[0], not_state)) == summarize(flat(cpu.programs[0], not_state))
    for which in (1, 2):
        for part in (lambda e: e.phase not in OUTSIDE_BODY, lambda e: e.phase == "zero_grad"):
            assert summarize(flat(view.programs[which], part)) == summarize(flat(cpu.programs[which], part))


@pytest.mark.parametrize(("model", "extra"), [
    (TINY, ["training.precision=amp-bf16", "training.activation_checkpointing=full"]),
    (TINY, ["training.precision=bf16", "training.grad_accum_steps=2"]),
    ("moe", ["training.precision=amp-bf16"]),
    ("deepseek", ["training.precision=bf16", "model.deepseek_transformers=true"]),
    ("gpt2", ["training.precision=fp32"]),
])
def test_marked_body_is_the_familys_forward_backward(model: dict | str, extra: list[str]) -> None:
    """The events the single-device step and FSDP2's ranks share (``marked_body``) are the family's own."""
    from estimator.families.base import get_family
    from estimator.simulate import marked_body, step_shape

    if model == "gpt2":
        cfg = load_config(None, ["model.preset=gpt2", "model.num_layers=2", "training.seq_len=16", *extra])
    elif model == "deepseek":
        from tests.moe.conftest import SMALL

        cfg = load_config(None, ["training.seq_len=8", *extra],
                          base={"model": {"family": "moe", **SMALL["deepseek-v3"]}})
    else:
        cfg = load_config(None, ["training.seq_len=8", "model.num_layers=3", *extra],
                          base={"model": _moe() if model == "moe" else model})
    from estimator.periodic import _signature

    events, marks = marked_body(cfg)
    family = get_family(cfg.model.family)
    # equal up to the numbers in names (a scratch buffer may be named after an object's id)
    assert _signature(events) == _signature(family.forward_backward_events(cfg.model, cfg.training, step_shape(cfg)))
    assert marks and all(0 <= at <= len(events) for at, _kind, _unit in marks)
