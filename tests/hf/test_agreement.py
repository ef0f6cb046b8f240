"""The analytic families against the real transformers model, per covered model_type (docs/hf.md, the matrix).

B=2, S=16, AdamW (for-loop), exact CPU bytes; the tiny configs of tests/hf/tiny_configs.py. The analytic side
runs with the transformers-style options hf_config sets (docs/transformer.md). Parameters are equal for every
type; each byte of the peaks' difference is accounted for below (or, where only measured, pinned and described
in docs/hf.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from estimator.api import estimate
from estimator.loader import load_config
from tests.hf.conftest import write_config
from tests.hf.tiny_configs import TINY_CONFIGS

pytest.importorskip("transformers")

B, S, D, HEAD = 2, 16, 64, 16


def _pair(tmp_path: Path, model_type: str, precision: str, **values: object) -> tuple:
    folder = write_config(tmp_path / model_type, {**TINY_CONFIGS[model_type], **values})
    sets = [f"training.seq_len={S}", f"training.batch_size={B}", f"training.precision={precision}",
            "optimizer.name=adamw", "device=cpu"]
    return tuple(estimate(load_config(overrides=[*sets, f"model.engine={engine}"],
                                      base={"model": {"hf_config": str(folder)}}))
                 for engine in ("analytic", "transformers"))


def _diffs(a: object, h: object) -> dict:
    roles = set(a.step.steady_peak.by_role) | set(h.step.steady_peak.by_role)
    return {"peak": h.peak_bytes - a.peak_bytes, "first": h.first_step_peak_bytes - a.first_step_peak_bytes,
            "saved": h.saved_activations - a.saved_activations,
            **{role: h.step.steady_peak.by_role.get(role, 0) - a.step.steady_peak.by_role.get(role, 0)
               for role in sorted(roles)}}


@pytest.mark.parametrize(("model_type", "precision"), [("llama", "fp32"), ("mistral", "fp32"), ("qwen2", "fp32"),
                                                       ("llama", "bf16"), ("llama", "amp-bf16")])
def test_llama_like_exact(tmp_path: Path, model_type: str, precision: str) -> None:
    """transformers' loss, labels, rotary buffers, rotary dtype and training-time cache modelled: equal to the byte."""
    a, h = _pair(tmp_path, model_type, precision)
    assert (a.parameters, a.flops.matmul) == (h.parameters, h.flops.matmul)
    d = _diffs(a, h)
    assert d["peak"] == d["first"] == d["input"] == d["parameter"] == 0, d
    if precision != "amp-bf16":  # under autocast the trace counts the weights' 16-bit copies as saved
        assert d["saved"] == 0, d


@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp-bf16"])
def test_gpt_neox_exact(tmp_path: Path, precision: str) -> None:
    """fused_qkv, rope_concat and the rest of transformers' step modelled: equal to the byte."""
    a, h = _pair(tmp_path, "gpt_neox", precision)
    assert (a.parameters, a.flops.matmul) == (h.parameters, h.flops.matmul)
    d = _diffs(a, h)
    assert d["peak"] == d["first"] == d["input"] == d["parameter"] == d["optimizer_state"] == 0, d
    if precision != "amp-bf16":
        assert d["saved"] == 0, d


def test_phi3_fp32_every_byte(tmp_path: Path) -> None:
    a, h = _pair(tmp_path, "phi3", "fp32")
    assert (a.parameters, a.flops.matmul) == (h.parameters, h.flops.matmul)
    d = _diffs(a, h)
    # fused qkv_proj and gate_up_proj modelled: state and saved bytes equal. Pinned, measured, not attributed: at
    # the optimizer-step peak transformers' step holds three fp32 temporaries of gate_up_proj's size (+4 B), the
    # estimate two (+260 B)
    assert d["optimizer_state"] == d["saved"] == d["parameter"] == 0, d
    assert d["peak"] == d["temporary"] == 3 * 2 * 96 * 64 * 4 + 4 - (2 * 2 * 96 * 64 * 4 + 260) == 48_896, d


def test_gpt2_fp32_gelu_new_and_dropout(tmp_path: Path) -> None:
    """GPT-2 as published (dropout 0.1 each): the three dropouts and the CPU's math attention modelled
    (docs/transformer.md); what is left is the position ids wpe's lookup saves, as without dropout. (bf16 and
    amp-bf16: benchmarks/hf_agreement.py, docs/hf.md.)"""
    a, h = _pair(tmp_path, "gpt2", "fp32")
    assert a.parameters == h.parameters
    d = _diffs(a, h)
    assert d["input"] == d["parameter"] == d["optimizer_state"] == 0 and d["saved"] == S * 8, d
    assert d["peak"] == S * 8 and d["first"] == 0, d
    # the math attention: two bmms forward, four backward (8·B·H·S²·h per layer, not SDPA's formula's 10)
    assert h.step.steady_peak.phase == "backward" and a.flops.matmul == h.flops.matmul == 21_233_664


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpt2_without_dropout(tmp_path: Path, precision: str) -> None:
    """gelu_new, the fused c_attn and the cache modelled: what is left is the position ids wpe's lookup saves."""
    a, h = _pair(tmp_path, "gpt2", precision, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    assert a.parameters == h.parameters
    d = _diffs(a, h)
    assert d["input"] == d["parameter"] == d["optimizer_state"] == 0 and d["saved"] == S * 8, d
    assert d["peak"] == S * 8 and d["first"] == 0, d  # the steady peak is in backward, where the ids still live


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_moe_bf16(tmp_path: Path, model_type: str) -> None:
    a, h = _pair(tmp_path, model_type, "bf16")
    assert (a.parameters, a.flops.matmul) == (h.parameters, h.flops.matmul)
    d = _diffs(a, h)
    # transformers' loss, labels and rotary buffers modelled (and for mixtral, qwen2_moe its rotary dtype and cache)
    assert d["input"] == d["parameter"] == d["peak"] == 0, d
    # qwen3_moe's first-step peak (in backward) is 480 B higher in the estimate: measured, not attributed
    assert d["first"] == (-480 if model_type == "qwen3_moe" else 0), d
    router = 256 if model_type == "mixtral" else 0  # pinned: mixtral saves 256 B more (docs/hf.md)
    assert d["saved"] == router, d


def test_deepseek_v3_bf16_exact(tmp_path: Path) -> None:
    """transformers' MLA (SDPA's math kernel: v is not padded), its router and parameter order modelled
    (``deepseek_transformers``, docs/moe.md): equal to the byte, matmuls included."""
    a, h = _pair(tmp_path, "deepseek_v3", "bf16")
    assert (a.parameters, a.flops.matmul) == (h.parameters, h.flops.matmul) == (91_808, 14_598_144)
    d = _diffs(a, h)
    assert d["peak"] == d["first"] == d["saved"] == d["input"] == d["parameter"] == 0, d
