"""Tiny ``config.json`` contents for every ``model_type`` the analytic families cover (tests, benchmarks).

Each is the published model's config shrunk (hidden 64, 2 layers, vocabulary 128, 4 heads): the keys
that choose the architecture are kept as the real checkpoints have them (GPT-2's ``gelu_new`` and
dropout 0.1, Phi-3's and GPT-NeoX's fused projections, Qwen2's q/k/v biases, grouped-query
attention). ``docs/hf.md`` has the agreement of the analytic families with transformers on them.
"""

from __future__ import annotations

from typing import Any

_COMMON = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "max_position_embeddings": 256}
_MOE = {**_COMMON, "num_key_value_heads": 2, "num_experts_per_tok": 2, "intermediate_size": 96}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 128, "n_embd": 64,
             "n_layer": 2, "n_head": 4, "n_positions": 256, "activation_function": "gelu_new",
             "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1},
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **_COMMON, "num_key_value_heads": 2,
              "intermediate_size": 96},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], **_COMMON,
                "num_key_value_heads": 2, "intermediate_size": 96, "sliding_window": 4096},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **_COMMON, "num_key_value_heads": 2,
              "intermediate_size": 96, "tie_word_embeddings": True},
    "phi3": {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], **_COMMON, "num_key_value_heads": 4,
             "intermediate_size": 96, "pad_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
             "attention_dropout": 0.0},
    "gpt_neox": {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], **_COMMON,
                 "intermediate_size": 256, "rotary_pct": 0.25, "use_parallel_residual": True,
                 "hidden_dropout": 0.0, "attention_dropout": 0.0},
    "mixtral": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **_MOE, "num_local_experts": 4},
    "qwen2_moe": {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], **_MOE, "num_experts": 4,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], **_MOE, "num_experts": 4,
                  "moe_intermediate_size": 32, "head_dim": 16},
    "olmoe": {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], **_MOE, "num_experts": 4},
    "deepseek_v3": {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], **_MOE,
                    "num_key_value_heads": 4, "n_routed_experts": 4, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
                    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1},
}
