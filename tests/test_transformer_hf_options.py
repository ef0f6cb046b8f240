"""The transformer family's transformers-style options against the project's torch model (docs/transformer.md).

Each option (``loss_upcast``, ``labels_from_inputs``, ...) is implemented in ``estimator.measure.transformer`` as
transformers writes it; the simulated events must equal the live-tensor tracker's measurement of that model (end
of forward, end of backward, forward and backward peaks), and the saved tensors ``activation_bytes`` lists must
equal what autograd saves.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from estimator.config import TrainingConfig
from estimator.families.base import StepShape, get_family
from estimator.families.transformer import activation_bytes
from estimator.measure.tracker import LiveTensorTracker
from estimator.measure.transformer import build_transformer, measure_saved_bytes
from estimator.timeline import curve, replay
from tests.transformer.conftest import small

SHAPES = {"fp32": StepShape(4, 4, 4, False), "bf16": StepShape(2, 2, 2, False),
          "amp-bf16": StepShape(2, 4, 4, True)}
FAMILY = get_family("transformer")
B, S = 2, 8
HF_LOSS = {"loss_upcast": True, "labels_from_inputs": True}
OPTIONS = {"hf-loss": HF_LOSS, "upcast-only": {"loss_upcast": True}, "labels-only": {"labels_from_inputs": True}}


def _track(cfg: object, precision: str, ckpt: str = "none") -> tuple[dict[str, int], dict[str, int]]:
    """(estimate, measured): end of forward, end of backward, forward and backward peaks, saved bytes."""
    torch.manual_seed(0)
    model = build_transformer(cfg, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                              activation_checkpointing=ckpt)
    idx = torch.randint(0, cfg.vocab_size, (B, S))
    targets = idx if cfg.labels_from_inputs else torch.randint(0, cfg.vocab_size, (B, S))
    amp = precision.startswith("amp")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    tracker = LiveTensorTracker("cpu")
    base = tracker.track_existing([*model.parameters(), idx, targets])
    with tracker:
        tracker.set_phase("forward")
        with autocast:
            loss = model(idx, targets)
        end_forward = tracker.live_bytes - base
        tracker.set_phase("backward")
        loss.backward()
    _, saved = measure_saved_bytes(model, idx, targets, torch.bfloat16 if amp else None)
    measured = {"end_forward": end_forward, "end": tracker.live_bytes - base,
                "peak_forward": tracker.phase_peaks["forward"] - base,
                "peak_backward": tracker.phase_peaks["backward"] - base,
                "saved": sum(v[2] for v in saved.values())}
    training = TrainingConfig(batch_size=B, seq_len=S, activation_checkpointing=ckpt, precision=precision)
    points = curve(FAMILY.forward_backward_events(cfg, training, SHAPES[precision]))
    forward = [v for phase, v in points if phase in ("forward", "loss")]
    backward = [v for phase, v in points if phase == "backward"]
    estimate = {"end_forward": forward[-1], "end": points[-1][1], "peak_forward": max(forward),
                "peak_backward": max(backward),
                "saved": activation_bytes(cfg, training, SHAPES[precision]) if ckpt == "none" else
                measured["saved"]}
    return estimate, measured


LOSS_CASES = list(itertools.product(["llama-gqa", "gpt2", "neox"], ["hf-loss"], sorted(SHAPES)))
LOSS_CASES += list(itertools.product(["llama-gqa"], ["upcast-only", "labels-only"], sorted(SHAPES)))


@pytest.mark.parametrize(("name", "option", "precision"), LOSS_CASES)
def test_hf_loss_events_match_tracker(name: str, option: str, precision: str) -> None:
    estimate, measured = _track(small(name, **OPTIONS[option]), precision)
    assert estimate == measured


@pytest.mark.parametrize("precision", ["bf16", "amp-bf16"])
def test_hf_loss_with_checkpointing(precision: str) -> None:
    estimate, measured = _track(small("llama-gqa", **HF_LOSS), precision, "full")
    if precision == "bf16":
        assert estimate == measured
        return
    # amp-bf16 under checkpointing: the plain model's backward peak is 64 B over already (tests/transformer/
    # test_events.py allows 128 B for autocast peaks); the option keeps that difference and adds none
    plain_estimate, plain_measured = _track(small("llama-gqa"), precision, "full")
    assert plain_estimate["peak_backward"] - plain_measured["peak_backward"] == 64
    assert {k: estimate[k] - measured[k] for k in estimate} == {
        "end_forward": 0, "end": 0, "peak_forward": 0, "peak_backward": 64, "saved": 0}


@pytest.mark.parametrize(("precision", "ckpt"), list(itertools.product(sorted(SHAPES), ["none", "full"])))
def test_gelu_new_events_match_tracker(precision: str, ckpt: str) -> None:
    estimate, measured = _track(small("gpt2", mlp="gelu_new", **HF_LOSS), precision, ckpt)
    assert estimate == measured


def test_hf_loss_by_hand() -> None:
    """bf16, T = 16 tokens, V = 97: the upcast saves fp32 log-probabilities (V·T·2 bytes more than bf16),
    the shifted labels (T·8) and a 2-byte-larger total weight; the targets input is gone (T·8)."""
    training = TrainingConfig(batch_size=B, seq_len=S, precision="bf16")
    shape = SHAPES["bf16"]
    plain, hf = small("llama-gqa"), small("llama-gqa", **HF_LOSS)
    t, v = B * S, 97
    assert activation_bytes(hf, training, shape) - activation_bytes(plain, training, shape) == v * t * 2 + t * 8 + 2
    inputs = [sum(e.nbytes for e in FAMILY.input_events(c, training, shape)) for c in (plain, hf)]
    assert inputs == [2 * t * 8, t * 8]
    live = replay(FAMILY.input_events(hf, training, shape) + FAMILY.forward_backward_events(hf, training, shape))
    assert {k for k, e in live.items() if e.role != "gradient"} == {"idx", "loss"} and live["loss"].nbytes == 4


def test_gelu_new_saves_five_hidden_tensors() -> None:
    """gelu_new saves x, 0.5·x, tanh(...), 1 + tanh(...) and the product: 3 [T, F] tensors more than F.gelu."""
    training = TrainingConfig(batch_size=B, seq_len=S)
    cfg, new = small("gpt2"), small("gpt2", mlp="gelu_new")
    t, f, layers = B * S, 4 * 32, 2
    assert activation_bytes(new, training, SHAPES["fp32"]) - activation_bytes(cfg, training, SHAPES["fp32"]) == (
        layers * 3 * t * f * 4)


def test_options_refused_with_tensor_parallelism() -> None:
    from estimator.errors import EstimatorError
    from estimator.families.transformer import check_tensor_parallel

    check_tensor_parallel(small("llama-gqa", **HF_LOSS), 1)
    with pytest.raises(EstimatorError, match=r"^model.loss_upcast: the transformers-style options loss_upcast, "
                       r"labels_from_inputs \(set by hf_config\) are not modelled with tensor parallelism"):
        check_tensor_parallel(small("llama-gqa", **HF_LOSS), 2)
    with pytest.raises(EstimatorError, match=r"^model.mlp: the transformers-style options mlp: gelu_new "):
        check_tensor_parallel(small("gpt2", mlp="gelu_new"), 2)


MOE_CASES = [("mixtral", "bf16", "none"), ("mixtral", "bf16", "full"), ("mixtral", "fp32", "none"),
             ("qwen2-moe", "bf16", "none"), ("olmoe", "bf16", "none"), ("qwen3-moe", "bf16", "none")]


@pytest.mark.parametrize(("name", "precision", "ckpt"), MOE_CASES)
def test_moe_hf_loss_peaks_equal_the_real_step(name: str, precision: str, ckpt: str) -> None:
    """The MoE family shares the loss (``transformer_events._Sim.hf_causal_lm_loss``): forward peak, backward
    peak and the bytes left after forward equal the CPU allocator's record of ``estimator.measure.moe``."""
    from tests.moe.conftest import small as small_moe
    from tests.moe.test_events import real_step, simulated

    cfg = small_moe(name, **HF_LOSS)
    real, counts = real_step(cfg, precision, ckpt)
    assert simulated(cfg, counts, precision, ckpt) == real


def test_moe_hf_loss_with_load_balancing_loss() -> None:
    from tests.moe.conftest import small as small_moe
    from tests.moe.test_events import real_step, simulated

    cfg = small_moe("mixtral", aux_loss_coef=0.02, **HF_LOSS)
    real, counts = real_step(cfg, "bf16", "none")
    assert simulated(cfg, counts, "bf16", "none") == real


ROPE_CASES = [("neox", "sdpa", p, c) for p in sorted(SHAPES) for c in ("none", "full")]
ROPE_CASES += [("llama-gqa", "sdpa", "fp32", "none"), ("llama-gqa", "sdpa", "bf16", "none"), ("neox", "eager", "fp32",
                                                                                              "none")]


@pytest.mark.parametrize(("name", "attention", "precision", "ckpt"), ROPE_CASES)
def test_rope_concat_events_match_tracker(name: str, attention: str, precision: str, ckpt: str) -> None:
    """Partial (neox) and full (llama) rotary dims: the cat, and o_proj's copy of the (B, H, S, h) output."""
    estimate, measured = _track(small(name, rope_concat=True, attention=attention, **HF_LOSS), precision, ckpt)
    assert estimate == measured


HF_ATTN = {"rope_stream_dtype": True, "kv_cache": True}
ATTN_CASES = [(n, p, c) for n in ("llama-gqa", "qwen2", "neox") for p in sorted(SHAPES) for c in ("none", "full")]


@pytest.mark.parametrize(("name", "precision", "ckpt"), ATTN_CASES)
def test_rope_stream_dtype_and_kv_cache_match_tracker(name: str, precision: str, ckpt: str) -> None:
    """transformers' rotary embedding (fp32 cos/sin under autocast) and its training-time DynamicCache."""
    extra = {"rope_concat": True} if name == "neox" else {}
    estimate, measured = _track(small(name, **HF_ATTN, **HF_LOSS, **extra), precision, ckpt)
    off = {k: estimate[k] - measured[k] for k in estimate if estimate[k] != measured[k]}
    # llama-gqa, amp-bf16, checkpointed: the plain model's backward peak is 64 B over (test_hf_loss_with_checkpointing)
    assert off == ({"peak_backward": 64} if (name, precision, ckpt) == ("llama-gqa", "amp-bf16", "full") else {})


@pytest.mark.parametrize(("name", "precision"), [("llama-gqa", "fp32"), ("neox", "bf16"), ("qwen2", "amp-bf16")])
def test_rope_buffers_equal_the_models_buffers(name: str, precision: str) -> None:
    """inv_freq and original_inv_freq: r/2 elements each in the parameter dtype, as setup events of role parameter."""
    cfg = small(name, rope_buffers=True)
    model = build_transformer(cfg, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    training = TrainingConfig(batch_size=B, seq_len=S, precision=precision)
    state = sum(e.nbytes for e in FAMILY.input_events(cfg, training, SHAPES[precision]) if e.role == "parameter")
    assert state == sum(b.untyped_storage().nbytes() for b in model.buffers()) == 2 * cfg.rotary_dim // 2 * (
        2 if precision == "bf16" else 4)


FUSED = {"fused_qkv": True, "rope_concat": True, **HF_ATTN, **HF_LOSS}
FUSED_CASES = [("llama-gqa", {**FUSED, "fused_gate_up": True}, p, c) for p in sorted(SHAPES) for c in ("none", "full")]
FUSED_CASES += [("neox", FUSED, p, "none") for p in sorted(SHAPES)]
FUSED_CASES += [("gpt2", {"fused_qkv": True, "mlp": "gelu_new", **HF_LOSS}, "fp32", "none"),
                ("llama-gqa", {"fused_qkv": True, "fused_gate_up": True, "rope_concat": True}, "bf16", "none")]


@pytest.mark.parametrize(("name", "options", "precision", "ckpt"), FUSED_CASES)
def test_fused_projections_match_tracker(name: str, options: dict, precision: str, ckpt: str) -> None:
    """One q/k/v (and gate/up) projection sliced: one input cast under autocast, full-size slice gradients."""
    estimate, measured = _track(small(name, **options), precision, ckpt)
    off = {k: estimate[k] - measured[k] for k in estimate if estimate[k] != measured[k]}
    # (amp-bf16 with checkpointing and fused_gate_up was one [T, d] bf16 tensor low until the simulation ran an
    # autocast input cast's backward before the weights' casts back, as the engine does: equal now)
    assert off == {}


@pytest.mark.parametrize(("precision", "kv_cache"), [("fp32", True), ("bf16", True), ("amp-bf16", True),
                                                     ("fp32", False)])
def test_gpt2_style_fused_attention_match_tracker(precision: str, kv_cache: bool) -> None:
    """GPT-2's c_attn: q, k, v slices of one output (no RoPE), the cache copying k and v."""
    cfg = small("gpt2", fused_qkv=True, kv_cache=kv_cache, mlp="gelu_new", **HF_LOSS)
    estimate, measured = _track(cfg, precision)
    assert estimate == measured


@pytest.mark.parametrize(("name", "precision", "ckpt"), [("mixtral", "amp-bf16", "none"), ("mixtral", "bf16", "none"),
                                                          ("qwen2-moe", "amp-bf16", "none"),
                                                          ("mixtral", "amp-bf16", "full"),
                                                          ("qwen3-moe", "amp-bf16", "none"),
                                                          ("olmoe", "amp-bf16", "none"), ("qwen3-moe", "bf16", "none"),
                                                          ("olmoe", "fp32", "full")])
def test_moe_rope_stream_dtype_and_kv_cache(name: str, precision: str, ckpt: str) -> None:
    """The MoE family's plain attention takes transformers' rotary dtype and cache too (allocator-exact)."""
    from tests.moe.conftest import small as small_moe
    from tests.moe.test_events import real_step, simulated

    cfg = small_moe(name, rope_stream_dtype=True, kv_cache=True, rope_buffers=True, **HF_LOSS)
    real, counts = real_step(cfg, precision, ckpt)
    assert simulated(cfg, counts, precision, ckpt) == real


DROPOUT = {"embd_dropout": 0.1, "resid_dropout": 0.1, "attn_dropout": 0.1}
GPT2_HF = {"fused_qkv": True, "kv_cache": True, "mlp": "gelu_new", **HF_LOSS, **DROPOUT}  # GPT-2 as hf_config reads it
DROPOUT_CASES = [("gpt2", GPT2_HF, p, "none") for p in sorted(SHAPES)] + [
    ("gpt2", GPT2_HF, "amp-bf16", "full"),
    ("gpt2", DROPOUT, "bf16", "none"),  # separate q/k/v, no cache: matmul copies k and v too
    ("gpt2", {**DROPOUT, "attention": "eager"}, "fp32", "none"),  # transformers' eager_attention_forward
    ("neox", {"embd_dropout": 0.1, "resid_dropout": 0.1, **FUSED}, "amp-bf16", "none")]  # GPT-NeoX's hidden_dropout


@pytest.mark.parametrize(("name", "options", "precision", "ckpt"), DROPOUT_CASES)
def test_dropout_events_match_tracker(name: str, options: dict, precision: str, ckpt: str) -> None:
    """Dropout as torch runs it on the CPU (a noise tensor saved by the product) and, with attention dropout, torch's
    math attention op by op. Seeded (_track), though the bytes do not depend on the mask's values."""
    estimate, measured = _track(small(name, **options), precision, ckpt)
    off = {k: estimate[k] - measured[k] for k in estimate if estimate[k] != measured[k]}
    # plain model, amp-bf16: an 8-byte scalar of the loss (tests/transformer/test_events.py allows it)
    assert off == ({"peak_forward": -8} if (options is DROPOUT or "attention" in options) and precision == "amp-bf16"
                   else {}), off


def test_dropout_saved_bytes_by_hand() -> None:
    """fp32, B=2, S=8, d=32, H=4, L=2: each dropout saves its noise (T·d each: the embeddings' and two per block);
    the math attention saves q·√s, kᵀ·√s and v batched ((B, H, S, h) each), the probabilities, the noise and the
    dropped probabilities ((B, H, S, S) each) and o_proj's copied input, instead of SDPA's q, k, v, output and
    logsumexp."""
    training = TrainingConfig(batch_size=B, seq_len=S)
    t, d, heads, layers = B * S, 32, 4, 2
    plain, drop = small("gpt2"), small("gpt2", **DROPOUT)
    math = 3 * t * d + 3 * B * heads * S * S + t * d
    flash = 3 * t * d + t * d + heads * t
    per_layer = 2 * t * d + math - flash
    assert activation_bytes(drop, training, SHAPES["fp32"]) - activation_bytes(plain, training, SHAPES["fp32"]) == (
        4 * (t * d + layers * per_layer))


@pytest.mark.parametrize(("precision", "ckpt"), [("fp32", "none"), ("amp-bf16", "full")])
def test_gpt2_dropout_peaks_equal_the_real_step(precision: str, ckpt: str) -> None:
    """GPT-2 as hf_config reads it (dropout 0.1 each): forward and backward peaks, the bytes left after forward and
    after backward equal the CPU allocator's record of the uninstrumented step (no dispatch mode, seeded)."""
    from estimator.measure.allocator import profile_allocations

    cfg = small("gpt2", **GPT2_HF)

    def run(marks) -> None:  # noqa: ANN001
        marks("build")
        torch.manual_seed(0)
        model = build_transformer(cfg, activation_checkpointing=ckpt)
        idx = torch.randint(0, cfg.vocab_size, (B, S))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "amp-bf16" else contextlib.nullcontext()
        marks("forward")
        with autocast:
            loss = model(idx, idx)
        marks("backward")
        loss.backward()
        marks("end")

    trace = profile_allocations(run)
    base = trace.live_before("forward").tensors
    real = (max(s.tensors for s in trace.within("forward")) - base, max(s.tensors for s in trace.within("backward"))
            - base, trace.live_before("backward").tensors - base, trace.live_before("end").tensors - base)
    estimate, _ = _track(cfg, precision, ckpt)
    assert real == (estimate["peak_forward"], estimate["peak_backward"], estimate["end_forward"], estimate["end"])


@pytest.mark.parametrize("ckpt", ["full"])  # without checkpointing: tests/hf/test_agreement.py (GPT-2's)
def test_dropout_matmul_flops_equal_flop_counter(ckpt: str) -> None:
    """Attention dropout: the CPU's math attention counts two bmms forward and four backward (8·B·H·S²·h, as eager);
    checkpointing reruns down_proj too, since the MLP dropout's noise is the last tensor a block saves."""
    from estimator.families.transformer import matmul_flops
    from estimator.measure.flop_formulas import count_step_flops

    cfg = small("gpt2", **GPT2_HF)
    torch.manual_seed(0)
    model = build_transformer(cfg, activation_checkpointing=ckpt)
    idx = torch.randint(0, cfg.vocab_size, (B, S))
    measured = count_step_flops(model, idx, idx)
    exact = matmul_flops(cfg, TrainingConfig(batch_size=B, seq_len=S, activation_checkpointing=ckpt))
    assert (measured.forward, measured.backward) == (exact.forward, exact.backward + exact.recompute)


def test_attention_dropout_with_rope_is_refused() -> None:
    with pytest.raises(ValueError, match="attn_dropout with attention: sdpa"):
        small("llama-gqa", attn_dropout=0.1)
