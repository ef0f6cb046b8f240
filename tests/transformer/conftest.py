"""Small transformer configs covering the architecture switches (built in torch by several tests)."""

from __future__ import annotations

from estimator.families.transformer import TransformerConfig

BASE = {"vocab_size": 97, "d_model": 32, "num_layers": 2, "num_heads": 4, "max_seq_len": 16}

SMALL: dict[str, dict] = {
    # GPT-2: learned positions, biased layernorm and linears, gelu, tied head.
    "gpt2": dict(BASE),
    # Llama with GQA: rope, rmsnorm, no biases, swiglu, untied head.
    "llama-gqa": {**BASE, "num_kv_heads": 2, "d_ff": 48, "mlp": "swiglu", "norm": "rmsnorm", "bias": False,
                  "positions": "rope", "tie_embeddings": False},
    # Qwen2-like: q/k/v biases only, one kv head, explicit head_dim != d_model / num_heads, tied.
    "qwen2": {**BASE, "num_kv_heads": 1, "head_dim": 16, "d_ff": 48, "mlp": "swiglu", "norm": "rmsnorm",
              "bias": False, "qkv_bias": True, "positions": "rope", "tie_embeddings": True},
    # GPT-NeoX: partial rope, parallel residual, biased, untied.
    "neox": {**BASE, "positions": "rope", "rotary_pct": 0.25, "parallel_residual": True,
             "tie_embeddings": False},
    # Untied GPT-2 without biases (layernorm weight only).
    "gpt2-nobias-untied": {**BASE, "bias": False, "tie_embeddings": False, "num_layers": 3},
}


def small(name: str, **overrides: object) -> TransformerConfig:
    return TransformerConfig(**{**SMALL[name], **overrides})
