"""Timeline events: internal consistency, and agreement with the live-tensor tracker on small models."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from estimator.config import TrainingConfig
from estimator.families.base import StepShape, get_family
from estimator.families.transformer import activation_bytes, parameter_tensors
from estimator.measure.tracker import LiveTensorTracker
from estimator.measure.transformer import build_transformer
from estimator.timeline import curve, replay

from .conftest import SMALL, small

SHAPES = {"fp32": StepShape(4, 4, 4, False), "bf16": StepShape(2, 2, 2, False),
          "amp-bf16": StepShape(2, 4, 4, True)}
FAMILY = get_family("transformer")


@pytest.mark.parametrize(("name", "attention", "ckpt", "precision"),
                         list(itertools.product(sorted(SMALL), ["sdpa", "eager"], ["none", "full"], SHAPES)))
def test_events_are_consistent(name: str, attention: str, ckpt: str, precision: str) -> None:
    cfg = small(name, attention=attention)
    training = TrainingConfig(batch_size=2, seq_len=8, activation_checkpointing=ckpt, precision=precision)
    shape = SHAPES[precision]
    events = FAMILY.forward_backward_events(cfg, training, shape)
    forward_saved = sum(e.nbytes for e in events
                        if e.role == "activation" and e.is_alloc and e.phase in ("forward", "loss"))
    assert forward_saved == activation_bytes(cfg, training, shape)
    live = replay(FAMILY.input_events(cfg, training, shape) + events)
    grads = {f"{p.name}.grad": p.numel * shape.gradient_bytes for p in parameter_tensors(cfg)}
    assert {k: v.nbytes for k, v in live.items() if v.role == "gradient"} == grads
    rest = {k for k, v in live.items() if v.role != "gradient"}
    assert rest == {"idx", "targets", "loss"}
    after = replay(FAMILY.end_of_step_events(cfg, training, shape), live)
    assert after.keys() == grads.keys() | {"idx", "targets"}


def _track(name: str, attention: str, ckpt: str, precision: str
           ) -> tuple[dict[str, int], list[int], list[int]]:
    cfg = small(name, attention=attention)
    torch.manual_seed(0)
    model = build_transformer(cfg, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                              activation_checkpointing=ckpt)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    targets = torch.randint(0, cfg.vocab_size, (2, 8))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("amp")
                else contextlib.nullcontext())
    tracker = LiveTensorTracker("cpu")
    base = tracker.track_existing([*model.parameters(), idx, targets])
    with tracker:
        tracker.set_phase("forward")
        with autocast:
            loss = model(idx, targets)
        end_forward = tracker.live_bytes - base
        tracker.set_phase("backward")
        loss.backward()
    measured = {"end_forward": end_forward, "end": tracker.live_bytes - base,
                "peak_forward": tracker.phase_peaks["forward"] - base,
                "peak_backward": tracker.phase_peaks["backward"] - base}
    training = TrainingConfig(batch_size=2, seq_len=8, activation_checkpointing=ckpt, precision=precision)
    points = curve(FAMILY.forward_backward_events(cfg, training, SHAPES[precision]))
    forward = [v for phase, v in points if phase in ("forward", "loss")]
    backward = [v for phase, v in points if phase == "backward"]
    estimate = {"end_forward": forward[-1], "end": points[-1][1], "peak_forward": max(forward),
                "peak_backward": max(backward)}
    return measured, list(estimate.values()), list(measured.values())


@pytest.mark.parametrize(("name", "attention", "ckpt"),
                         list(itertools.product(sorted(SMALL), ["sdpa", "eager"], ["none", "full"])))
def test_fp32_events_match_tracker(name: str, attention: str, ckpt: str) -> None:
    _, estimate, measured = _track(name, attention, ckpt, "fp32")
    assert estimate == measured  # end of forward, end of backward, forward peak, backward peak


@pytest.mark.parametrize(("name", "attention", "ckpt", "precision"),
                         list(itertools.product(["gpt2", "neox", "llama-gqa"], ["sdpa"], ["none", "full"],
                                                ["bf16", "amp-bf16"])))
def test_16bit_events_match_tracker(name: str, attention: str, ckpt: str, precision: str) -> None:
    _, estimate, measured = _track(name, attention, ckpt, precision)
    if precision == "bf16":
        assert estimate == measured
        return
    assert estimate[:2] == measured[:2]  # live bytes at the end of forward and of backward
    # Autocast peaks are within a few scalars (an 8-byte loss-side scalar, one bias-grad cast).
    for est, got in zip(estimate[2:], measured[2:], strict=True):
        assert abs(est - got) <= 128
