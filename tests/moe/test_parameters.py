"""Parameter counts: every MoE preset against its published total, and each HF model type against
transformers' own class instantiated on the meta device from the same config.json."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from estimator.families.moe import MoEConfig, active_parameter_count, parameter_count, parameter_tensors
from estimator.hf_config import read_hf_config
from estimator.presets import PRESETS

from .conftest import SMALL, small

ROOT = Path(__file__).resolve().parents[2]
HF_CONFIGS = {  # shipped config.json -> the preset it stands for
    "mixtral-8x7b-moe.json": "mixtral-8x7b",
    "qwen3-30b-a3b-moe.json": "qwen3-30b-a3b",
    "qwen1.5-moe-a2.7b.json": "qwen1.5-moe-a2.7b",
    "olmoe-1b-7b.json": "olmoe-1b-7b",
    "deepseek-v3-moe.json": "deepseek-v3",
}
MOE_PRESETS = sorted(name for name, p in PRESETS.items() if p.family == "moe")


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_preset_totals_are_published(name: str) -> None:
    preset = PRESETS[name]
    assert parameter_count(preset.config()) == preset.params


def test_issue_totals_and_active_counts() -> None:
    """The totals the issue names, and active counts against the model cards' rounded figures."""
    cfg = {name: PRESETS[name].config() for name in ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "olmoe-1b-7b")}
    assert parameter_count(cfg["mixtral-8x7b"]) == 46_702_792_704
    assert parameter_count(cfg["qwen3-30b-a3b"]) == 30_532_122_624
    assert parameter_count(cfg["deepseek-v3"]) == 671_026_404_352
    # Mixtral: 12.9B active (Jiang et al. 2024); Qwen3-30B-A3B: 3.3B; DeepSeek-V3: 37B; OLMoE: 1.3B.
    assert active_parameter_count(cfg["mixtral-8x7b"]) == 12_879_925_248
    assert round(active_parameter_count(cfg["qwen3-30b-a3b"]) / 1e8) == 34
    assert round(active_parameter_count(cfg["deepseek-v3"]) / 1e9) == 38
    assert round(active_parameter_count(cfg["olmoe-1b-7b"]) / 1e8) == 13


@pytest.mark.parametrize("filename", sorted(HF_CONFIGS))
def test_hf_config_matches_preset(filename: str) -> None:
    values = read_hf_config(ROOT / "configs" / "hf" / filename)
    assert values.pop("family") == "moe"
    cfg = MoEConfig(**values)
    assert parameter_count(cfg) == PRESETS[HF_CONFIGS[filename]].params


def _meta_count(model_type: str, data: dict) -> int:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf = transformers.AutoConfig.for_model(model_type, **data)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(hf)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("filename", sorted(HF_CONFIGS))
def test_hf_config_against_transformers_on_meta(filename: str) -> None:
    data = json.loads((ROOT / "configs" / "hf" / filename).read_text())
    model_type = data.pop("model_type")
    cfg = MoEConfig(**{k: v for k, v in read_hf_config(ROOT / "configs" / "hf" / filename).items() if k != "family"})
    assert parameter_count(cfg) == _meta_count(model_type, data)


def test_mixtral_8x22b_against_transformers_on_meta() -> None:
    """The one preset without a shipped config.json: its hub config's keys, counted by transformers."""
    data = {"hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48,
            "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32768,
            "max_position_embeddings": 65536, "tie_word_embeddings": False}
    assert PRESETS["mixtral-8x22b"].params == _meta_count("mixtral", data)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_configs_match_our_torch_module(name: str) -> None:
    torch = pytest.importorskip("torch")
    from estimator.measure.moe import build_moe

    cfg = small(name)
    with torch.device("meta"):
        model = build_moe(cfg, device="meta")
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == [(p.name, p.shape) for p in parameter_tensors(cfg)]


def test_routing_list_count_is_checked() -> None:
    with pytest.raises(ValueError, match="expected 1 or 2 lists"):
        MoEConfig(num_layers=2, num_experts=2, experts_per_token=1,
                  routing={"mode": "measured", "tokens_per_expert": [[1, 1], [1, 1], [1, 1]]})
