"""The MoE event simulation against the real step: the CPU allocator's own record (torch.profiler,
no dispatch mode, so autograd sums gradients as it really does), under the routing the step had."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from estimator.config import TrainingConfig
from estimator.families.base import StepShape, get_family
from estimator.families.moe import MoEConfig, parameter_tensors
from estimator.measure.allocator import profile_allocations
from estimator.measure.moe import build_moe
from estimator.timeline import curve, replay

from .conftest import DEEPSEEK_HF, SMALL, small

SHAPES = {"fp32": StepShape(4, 4, 4, False), "bf16": StepShape(2, 2, 2, False),
          "amp-bf16": StepShape(2, 4, 4, True)}
FAMILY = get_family("moe")
B, S = 2, 8


@pytest.mark.parametrize(("name", "ckpt", "precision"),
                         list(itertools.product(sorted(SMALL), ["none", "full"], SHAPES)))
def test_events_are_consistent(name: str, ckpt: str, precision: str) -> None:
    """Saved bytes equal the family's figure; after backward only gradients, inputs and the loss remain."""
    cfg = small(name)
    training = TrainingConfig(batch_size=B, seq_len=S, activation_checkpointing=ckpt, precision=precision)
    shape = SHAPES[precision]
    events = FAMILY.forward_backward_events(cfg, training, shape)
    assert FAMILY.activation_bytes(cfg, training, shape) == sum(
        e.nbytes for e in events if e.role == "activation" and e.is_alloc and e.phase in ("forward", "loss"))
    live = replay(FAMILY.input_events(cfg, training, shape) + events)
    grads = {f"{p.name}.grad": p.numel * shape.gradient_bytes for p in parameter_tensors(cfg)}
    assert {k: v.nbytes for k, v in live.items() if v.role == "gradient"} == grads
    assert {k for k, v in live.items() if v.role != "gradient"} == {"idx", "targets", "loss"}


def real_step(cfg: MoEConfig, precision: str, ckpt: str) -> tuple[tuple[int, int, int], list[list[int]]]:
    """(forward peak, backward peak, end of forward) above the step's start, and the tokens per expert."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    box: dict = {}

    def run(marks) -> None:  # noqa: ANN001
        marks("build")
        torch.manual_seed(0)
        model = build_moe(cfg, dtype=dtype, activation_checkpointing=ckpt)
        idx = torch.randint(0, cfg.vocab_size, (B, S))
        targets = torch.randint(0, cfg.vocab_size, (B, S))
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("amp")
                    else contextlib.nullcontext())
        marks("forward")
        with autocast:
            loss = model(idx, targets)
        marks("backward")
        loss.backward()
        marks("end")
        box["counts"] = model.tokens_per_expert

    trace = profile_allocations(run)
    base = trace.live_before("forward").tensors
    forward = max(s.tensors for s in trace.within("forward")) - base
    backward = max(s.tensors for s in trace.within("backward")) - base
    return (forward, backward, trace.live_before("backward").tensors - base), box["counts"]


def simulated(cfg: MoEConfig, counts: list[list[int]], precision: str, ckpt: str) -> tuple[int, int, int]:
    measured = MoEConfig(**{**cfg.model_dump(), "routing": {"mode": "measured", "tokens_per_expert": counts}})
    training = TrainingConfig(batch_size=B, seq_len=S, activation_checkpointing=ckpt, precision=precision)
    points = curve(FAMILY.forward_backward_events(measured, training, SHAPES[precision]))
    forward = [v for phase, v in points if phase in ("forward", "loss")]
    return max(forward), max(v for phase, v in points if phase == "backward"), forward[-1]


IMPLEMENTATIONS = ["grouped_mm", "eager"]
CASES = [(n, c, p, i) for n, c, p, i in itertools.product(sorted(SMALL), ["none", "full"], ["fp32", "bf16"],
                                                          IMPLEMENTATIONS)
         if not (n == "deepseek-v3" and p == "bf16")]  # its fp32 router in bf16: see test_deepseek_bf16


@pytest.mark.parametrize(("name", "ckpt", "precision", "impl"), CASES)
def test_peaks_equal_the_real_step(name: str, ckpt: str, precision: str, impl: str) -> None:
    """Forward peak, backward peak and the bytes left after forward: exact, to the byte."""
    cfg = small(name, experts_implementation=impl)
    real, counts = real_step(cfg, precision, ckpt)
    sim = simulated(cfg, counts, precision, ckpt)
    if name == "deepseek-v3" and ckpt == "full":
        # the group-limited router's short-lived scores (not saved, so never rerun) are not modelled:
        # they can top a tiny checkpointed forward by a few hundred bytes; backward stays exact
        assert sim[1:] == real[1:] and abs(sim[0] - real[0]) <= 0.05 * real[0]
        return
    assert sim == real


AUX_CASES = [(n, c, p, "grouped_mm") for n, c, p in itertools.product(sorted(set(SMALL) - {"deepseek-v3"}),
                                                                      ["none", "full"], ["fp32", "bf16"])]
AUX_CASES += [("mixtral", c, p, "eager") for c, p in itertools.product(["none", "full"], ["fp32", "bf16"])]


@pytest.mark.parametrize(("name", "ckpt", "precision", "impl"), AUX_CASES)
def test_load_balancing_loss_peaks_equal_the_real_step(name: str, ckpt: str, precision: str, impl: str) -> None:
    """aux_loss_coef > 0: transformers' load_balancing_loss_func over the collected router logits, exact."""
    cfg = small(name, experts_implementation=impl, aux_loss_coef=0.02)
    real, counts = real_step(cfg, precision, ckpt)
    assert simulated(cfg, counts, precision, ckpt) == real
    no_aux = simulated(small(name, experts_implementation=impl), counts, precision, ckpt)
    assert real[2] > no_aux[2]  # the (T, E) softmax of every MoE block is kept for backward


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_deepseek_bf16_within_one_and_a_half_percent(impl: str) -> None:
    """The group-limited router's unmodelled short-lived tensors (128 B per MoE block here) add up over the
    blocks: eager is 256 B short of 32,516 B at the forward peak, grouped_mm 384 B short of 32,432 B; the
    experts' own allocations from ``sort`` to the gather back are equal to the byte (measured)."""
    cfg = small("deepseek-v3", experts_implementation=impl)
    real, counts = real_step(cfg, "bf16", "none")
    sim = simulated(cfg, counts, "bf16", "none")
    assert all(abs(s - r) <= 0.015 * r for s, r in zip(sim, real, strict=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp-bf16"])
def test_deepseek_as_transformers_writes_it_equals_the_real_step(precision: str) -> None:
    """transformers' MLA (split/cat, interleaved RoPE, the cached latents, ``new_empty`` + ``copy_`` keys, SDPA's
    math kernel) and its router (``e_score_correction_bias``, in-place renormalisation), with its loss: exact."""
    cfg = small("deepseek-v3", **DEEPSEEK_HF, loss_upcast=True, labels_from_inputs=True, rope_buffers=True)
    real, counts = real_step(cfg, precision, "none")
    assert simulated(cfg, counts, precision, "none") == real


def test_deepseek_as_transformers_writes_it_checkpointed() -> None:
    """Backward and the bytes left after forward exact. The forward peak is inside SDPA's math kernel, whose
    decomposed temporaries (what ``verify``'s dispatch-mode tracker sees, and the estimate models: 9,472 B, equal
    to the tracker's) the allocator books as one op's internal blocks, which ``real_step`` leaves out (9,248 B)."""
    cfg = small("deepseek-v3", **DEEPSEEK_HF)
    real, counts = real_step(cfg, "fp32", "full")
    sim = simulated(cfg, counts, "fp32", "full")
    assert sim[1:] == real[1:] and real[0] <= sim[0] <= 1.03 * real[0]


def test_routing_changes_the_backward_transients() -> None:
    """All tokens to two experts (worst case) vs balanced: same saved bytes, a different backward."""
    training = TrainingConfig(batch_size=B, seq_len=S)
    shape = SHAPES["fp32"]
    balanced = small("mixtral")
    worst = small("mixtral", routing={"mode": "worst"})
    assert FAMILY.activation_bytes(balanced, training, shape) == FAMILY.activation_bytes(worst, training, shape)
    assert FAMILY.forward_backward_events(balanced, training, shape) != FAMILY.forward_backward_events(
        worst, training, shape)


@pytest.mark.parametrize("overrides", [
    {"num_layers": 12},
    {"num_layers": 13, "first_dense_layers": 2, "d_ff": 10, "moe_layer_step": 2, "experts_implementation": "eager"},
    {"num_layers": 11, "routing": {"mode": "capacity", "capacity_factor": 1.5}, "aux_loss_coef": 0.01},
])
def test_saved_bytes_of_a_deep_model_read_off_small_ones(overrides: dict) -> None:
    """activation_bytes extrapolates the per-period growth of 4-8 layer models: equal to the whole model's events."""
    from estimator.families.moe import _saved_bytes

    cfg = small("mixtral", **overrides)
    training = TrainingConfig(batch_size=B, seq_len=S)
    for shape in SHAPES.values():
        assert FAMILY.activation_bytes(cfg, training, shape) == _saved_bytes(cfg, training, shape)
