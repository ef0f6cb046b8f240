"""Named transformer configurations with their published parameter counts.

Each preset carries the :class:`~estimator.families.transformer.TransformerConfig` field values
taken from the model's official ``config.json`` (Hugging Face hub), the total parameter count the
checkpoint publishes (model card / safetensors metadata / paper table) and where that comes from.
The tests check ``parameter_count(preset) == published`` exactly. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from estimator.names import lookup


@dataclass(frozen=True)
class Preset:
    """A named model: its config field values, the published parameter count and its source."""

    name: str
    values: dict[str, Any] = field(hash=False)
    params: int  # published total parameter count (a tied head counted once)
    source: str
    family: str = "transformer"  # or "moe" (estimator.families.moe)

    def fields(self) -> dict[str, Any]:
        """The model section this preset stands for (a fresh dict, ``family`` included)."""
        return {"family": self.family, **self.values}

    def config(self) -> Any:
        """The validated family config (:class:`TransformerConfig` or :class:`MoEConfig`)."""
        from estimator.config import FAMILY_CONFIGS

        return FAMILY_CONFIGS[self.family](**self.values)


_GPT2 = {"mlp": "gelu", "norm": "layernorm", "bias": True, "positions": "learned", "tie_embeddings": True,
         "vocab_size": 50257, "max_seq_len": 1024, "norm_eps": 1e-5}
_LLAMA = {"mlp": "swiglu", "norm": "rmsnorm", "bias": False, "positions": "rope", "tie_embeddings": False}
_NEOX = {"mlp": "gelu", "norm": "layernorm", "bias": True, "positions": "rope", "rotary_pct": 0.25,
         "parallel_residual": True, "tie_embeddings": False, "vocab_size": 50304, "max_seq_len": 2048,
         "norm_eps": 1e-5, "rope_theta": 10000.0}

_HF = "config.json of {repo} on the Hugging Face hub; total from the checkpoint's parameters"


def _p(name: str, params: int, source: str, **values: Any) -> Preset:
    return Preset(name, values, params, source)


_ALL = [
    # GPT-2 (Radford et al. 2019): the paper rounds to 117M/345M/762M/1542M (its small count left
    # out the position table); the exact totals are those of the released checkpoints.
    _p("gpt2", 124_439_808, _HF.format(repo="openai-community/gpt2"),
       **_GPT2, d_model=768, num_layers=12, num_heads=12),
    _p("gpt2-medium", 354_823_168, _HF.format(repo="openai-community/gpt2-medium"),
       **_GPT2, d_model=1024, num_layers=24, num_heads=16),
    _p("gpt2-large", 774_030_080, _HF.format(repo="openai-community/gpt2-large"),
       **_GPT2, d_model=1280, num_layers=36, num_heads=20),
    _p("gpt2-xl", 1_557_611_200, _HF.format(repo="openai-community/gpt2-xl"),
       **_GPT2, d_model=1600, num_layers=48, num_heads=25),
    # Llama 2 (Touvron et al. 2023), HF conversions.
    _p("llama-2-7b", 6_738_415_616, _HF.format(repo="meta-llama/Llama-2-7b-hf"),
       **_LLAMA, vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, d_ff=11008,
       max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0),
    _p("llama-2-13b", 13_015_864_320, _HF.format(repo="meta-llama/Llama-2-13b-hf"),
       **_LLAMA, vocab_size=32000, d_model=5120, num_layers=40, num_heads=40, d_ff=13824,
       max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0),
    _p("llama-2-70b", 68_976_648_192, _HF.format(repo="meta-llama/Llama-2-70b-hf"),
       **_LLAMA, vocab_size=32000, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8,
       d_ff=28672, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0),
    # Llama 3 (Grattafiori et al. 2024, "The Llama 3 Herd of Models").
    _p("llama-3-8b", 8_030_261_248, _HF.format(repo="meta-llama/Meta-Llama-3-8B"),
       **_LLAMA, vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
       d_ff=14336, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0),
    _p("llama-3-70b", 70_553_706_496, _HF.format(repo="meta-llama/Meta-Llama-3-70B"),
       **_LLAMA, vocab_size=128256, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8,
       d_ff=28672, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0),
    # Mistral 7B (Jiang et al. 2023); the 4096-token sliding window does not change the count.
    _p("mistral-7b", 7_241_732_096, _HF.format(repo="mistralai/Mistral-7B-v0.1"),
       **_LLAMA, vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
       d_ff=14336, max_seq_len=32768, norm_eps=1e-5, rope_theta=10000.0),
    # TinyLlama (Zhang et al. 2024) and Qwen2 (Yang et al. 2024): also shipped under configs/hf/.
    _p("tinyllama-1.1b", 1_100_048_384,
       _HF.format(repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
       **_LLAMA, vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
       d_ff=5632, max_seq_len=2048, norm_eps=1e-5, rope_theta=10000.0),
    _p("qwen2-0.5b", 494_032_768, _HF.format(repo="Qwen/Qwen2-0.5B"),
       **{**_LLAMA, "tie_embeddings": True}, qkv_bias=True, vocab_size=151936, d_model=896, num_layers=24,
       num_heads=14, num_kv_heads=2, d_ff=4864, max_seq_len=131072, norm_eps=1e-6, rope_theta=1000000.0),
    # Pythia (Biderman et al. 2023, Table 1 / the EleutherAI/pythia README): GPT-NeoX blocks,
    # vocabulary padded to 50304.
    _p("pythia-70m", 70_426_624, _HF.format(repo="EleutherAI/pythia-70m") + "; Pythia README",
       **_NEOX, d_model=512, num_layers=6, num_heads=8),
    _p("pythia-160m", 162_322_944, _HF.format(repo="EleutherAI/pythia-160m") + "; Pythia README",
       **_NEOX, d_model=768, num_layers=12, num_heads=12),
    _p("pythia-410m", 405_334_016, _HF.format(repo="EleutherAI/pythia-410m") + "; Pythia README",
       **_NEOX, d_model=1024, num_layers=24, num_heads=16),
    _p("pythia-1b", 1_011_781_632, _HF.format(repo="EleutherAI/pythia-1b") + "; Pythia README",
       **_NEOX, d_model=2048, num_layers=16, num_heads=8),
]


def _moe(name: str, params: int, source: str, **values: Any) -> Preset:
    return Preset(name, values, params, source, family="moe")


_MOE_HF = "config.json of {repo}; total from the published checkpoint"
_MOE_META = "config.json of {repo}; total = transformers' {cls} on the meta device (tests/moe)"

_ALL += [
    # Mixtral of Experts (Jiang et al. 2024): 46.7B total, 12.9B active; 8 experts, top-2.
    _moe("mixtral-8x7b", 46_702_792_704, _MOE_HF.format(repo="mistralai/Mixtral-8x7B-v0.1"),
         vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, num_experts=8,
         experts_per_token=2, expert_d_ff=14336, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5),
    _moe("mixtral-8x22b", 140_630_071_296, _MOE_META.format(repo="mistralai/Mixtral-8x22B-v0.1",
                                                            cls="MixtralForCausalLM"),
         vocab_size=32768, d_model=6144, num_layers=56, num_heads=48, num_kv_heads=8, num_experts=8,
         experts_per_token=2, expert_d_ff=16384, max_seq_len=65536, rope_theta=1e6, norm_eps=1e-5),
    # Qwen3 technical report (Yang et al. 2025): 30.5B total, 3.3B active; q/k RMSNorm per head.
    _moe("qwen3-30b-a3b", 30_532_122_624, _MOE_HF.format(repo="Qwen/Qwen3-30B-A3B"),
         vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
         qk_norm="head", num_experts=128, experts_per_token=8, expert_d_ff=768, d_ff=6144,
         max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6),
    # Qwen1.5-MoE-A2.7B: 60 experts top-4 plus a gated shared expert, q/k/v biases; top-k not renormalised.
    _moe("qwen1.5-moe-a2.7b", 14_315_784_192, _MOE_META.format(repo="Qwen/Qwen1.5-MoE-A2.7B",
                                                               cls="Qwen2MoeForCausalLM"),
         vocab_size=151936, d_model=2048, num_layers=24, num_heads=16, qkv_bias=True, num_experts=60,
         experts_per_token=4, expert_d_ff=1408, shared_expert_d_ff=5632, shared_expert_gate=True, d_ff=5632,
         norm_topk_prob=False, max_seq_len=8192, rope_theta=1e6, norm_eps=1e-6),
    # OLMoE (Muennighoff et al. 2024): 6.9B total, 1.3B active; q/k RMSNorm over all heads.
    _moe("olmoe-1b-7b", 6_919_161_856, _MOE_META.format(repo="allenai/OLMoE-1B-7B-0924", cls="OlmoeForCausalLM"),
         vocab_size=50304, d_model=2048, num_layers=16, num_heads=16, qk_norm="full", num_experts=64,
         experts_per_token=8, expert_d_ff=1024, d_ff=1024, norm_topk_prob=False, max_seq_len=4096,
         rope_theta=10000.0, norm_eps=1e-5),
    # DeepSeek-V3 technical report (DeepSeek-AI 2024, section 2): 671B total, 37B active, without the
    # 14B multi-token-prediction module; MLA, 3 dense blocks, 256 routed + 1 shared expert, top-8.
    _moe("deepseek-v3", 671_026_404_352, _MOE_HF.format(repo="deepseek-ai/DeepSeek-V3") + " (MTP excluded)",
         vocab_size=129280, d_model=7168, num_layers=61, num_heads=128, attention_type="mla", q_lora_rank=1536,
         kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, d_ff=18432,
         first_dense_layers=3, num_experts=256, experts_per_token=8, expert_d_ff=2048, shared_expert_d_ff=2048,
         router="sigmoid", router_fp32=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
         max_seq_len=163840, rope_theta=10000.0, norm_eps=1e-6),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}

TRAINING_DEFAULTS: dict[str, str] = {"optimizer.name": "adamw", "training.precision": "amp-bf16"}
"""How a preset or a Hugging Face config is trained unless the config says otherwise.

AdamW in bf16 mixed precision (``torch.autocast``): how Llama 2 was trained (AdamW, Touvron et al.
2023, section 2.2; Llama 3 the same, Grattafiori et al. 2024) and what Hugging Face's Trainer runs
with its default optimizer (``adamw_torch``) and ``bf16=True``. The seed's own example keeps the
seed's AdaGrad in fp32. An explicit ``-o``/``-p``, ``--set`` or a config file's ``optimizer.name``
/ ``training.precision`` always wins.
"""


def apply_training_defaults(data: dict[str, Any]) -> tuple[str, ...]:
    """Fill :data:`TRAINING_DEFAULTS` into a raw config whose model is a preset, an hf_config or a hub id.

    Only keys the config leaves out are filled; the sections are replaced by new dicts (the caller's
    nested mappings are not modified). Returns the ``path=value`` pairs filled in, for the header.
    """
    model = data.get("model")
    if not isinstance(model, dict) or not any(key in model for key in ("preset", "hf_config", "hub")):
        return ()
    applied = []
    for path, value in TRAINING_DEFAULTS.items():
        section_name, key = path.split(".")
        section = data.get(section_name, {})
        if isinstance(section, dict) and key not in section:
            data[section_name] = {**section, key: value}
            applied.append(f"{path}={value}")
    return tuple(applied)


def preset_names() -> list[str]:
    """The known preset names, in table order."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive); EstimatorError names the closest match."""
    return lookup(PRESETS, name, "model.preset", "preset")


def model_section(name: str) -> dict[str, Any]:
    """The model section ``--model NAME`` stands for, looked up in this order:

    1. a preset name (``estimator models``; case-insensitive): ``{preset: NAME}``;
    2. a local path: a ``config.json`` (or any JSON file) or a directory holding one: ``{hf_config: PATH}``;
    3. a hub id ``org/name`` (optionally ``@revision``): ``{hub: org/name}``, read through
       huggingface_hub's cache (``estimator.hub``; docs/hf.md).

    Anything else is an error naming the closest preset.
    """
    from pathlib import Path

    from estimator.hub import is_hub_id

    text = name.strip()
    if text.lower() in PRESETS:
        return {"preset": text}
    path = Path(text).expanduser()
    try:
        local = path.is_file() or (path.is_dir() and (path / "config.json").is_file())
    except OSError:
        local = False
    if local:
        return {"hf_config": str(path)}  # as given: relative to the current directory
    if is_hub_id(text):
        return {"hub": text}
    from estimator.errors import EstimatorError
    from estimator.names import did_you_mean

    raise EstimatorError(f"--model {name}: not a preset (`estimator models`), a local config.json or a directory "
                         f"holding one, or a hub id org/name{did_you_mean(text.lower(), list(PRESETS))}")
