"""Small MoE configs covering the architecture switches (built in torch by several tests)."""

from __future__ import annotations

from estimator.families.moe import MoEConfig

BASE = {"vocab_size": 17, "d_model": 8, "num_layers": 2, "num_heads": 2, "num_experts": 4, "experts_per_token": 2,
        "expert_d_ff": 8, "max_seq_len": 16}

SMALL: dict[str, dict] = {
    # Mixtral: GQA, softmax router, renormalised top-2, no shared expert.
    "mixtral": {**BASE, "num_kv_heads": 1},
    # Qwen1.5/2-MoE: q/k/v biases, a gated shared expert, top-k not renormalised.
    "qwen2-moe": {**BASE, "qkv_bias": True, "shared_expert_d_ff": 5, "shared_expert_gate": True,
                  "norm_topk_prob": False},
    # Qwen3-MoE: per-head q/k norms, explicit head_dim; a dense first block.
    "qwen3-moe": {**BASE, "qk_norm": "head", "head_dim": 4, "num_layers": 3, "first_dense_layers": 1, "d_ff": 10},
    # OLMoE: q/k norms over all heads, tied embeddings.
    "olmoe": {**BASE, "qk_norm": "full", "tie_embeddings": True},
    # DeepSeek-V3: MLA with q compression, a dense first block, shared expert, sigmoid group-limited router.
    "deepseek-v3": {**BASE, "num_layers": 3, "attention_type": "mla", "q_lora_rank": 6, "kv_lora_rank": 4,
                    "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 3, "first_dense_layers": 1,
                    "d_ff": 10, "shared_expert_d_ff": 6, "router": "sigmoid", "router_fp32": True, "n_group": 2,
                    "topk_group": 1, "routed_scaling_factor": 2.5},
}


def small(name: str, **overrides: object) -> MoEConfig:
    return MoEConfig(**{**SMALL[name], **overrides})

#: What an hf_config of deepseek_v3 sets: transformers' MLA and router (and its rotary dtype and training-time cache).
DEEPSEEK_HF = {"deepseek_transformers": True, "kv_cache": True, "rope_stream_dtype": True}
