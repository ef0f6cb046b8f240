"""Parameter tensors: presets against published totals, HF configs, and the torch model's names/shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from estimator.errors import EstimatorError
from estimator.families.base import get_family
from estimator.families.transformer import TransformerConfig, parameter_count, parameter_tensors
from estimator.hf_config import read_hf_config
from estimator.measure.transformer import build_transformer
from estimator.presets import PRESETS, get_preset, preset_names

from .conftest import SMALL, small

HF_DIR = Path(__file__).resolve().parents[2] / "configs" / "hf"

PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "tinyllama-1.1b": 1_100_048_384,
    "qwen2-0.5b": 494_032_768,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
}


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if p.family == "transformer"))  # moe: tests/moe
def test_preset_count_is_published_figure(name: str) -> None:
    preset = get_preset(name)
    assert parameter_count(preset.config()) == preset.params == PUBLISHED[name]
    assert preset.source


def test_all_required_presets_exist() -> None:
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b", "llama-2-13b", "llama-3-8b",
            "mistral-7b"} <= set(preset_names())


def test_preset_fields_build_a_config() -> None:
    fields = get_preset("llama-3-8b").fields()
    assert fields["family"] == "transformer"
    cfg = TransformerConfig(**fields)
    assert (cfg.d_model, cfg.num_layers, cfg.kv_heads) == (4096, 32, 8)
    assert (cfg.ffn_dim, cfg.rope_theta, cfg.vocab_size) == (14336, 5e5, 128256)
    fields["d_model"] = 1  # a fresh dict each time
    assert get_preset("llama-3-8b").fields()["d_model"] == 4096


def test_preset_typo_names_closest_match() -> None:
    with pytest.raises(EstimatorError, match="did you mean 'llama-2-7b'") as info:
        get_preset("lama-2-7b")
    assert "gpt2-medium" in str(info.value)
    assert get_preset(" GPT2 ").name == "gpt2"


def test_non_embedding_pythia_counts() -> None:
    # The Pythia README's non-embedding figures: total minus the two V x d matrices.
    for name, non_embedding in [("pythia-70m", 18_915_328), ("pythia-160m", 85_056_000)]:
        cfg = get_preset(name).config()
        assert parameter_count(cfg) - 2 * cfg.vocab_size * cfg.d_model == non_embedding


@pytest.mark.parametrize(
    ("file", "published"),
    [("tinyllama-1.1b.json", 1_100_048_384), ("qwen2-0.5b.json", 494_032_768), ("gpt2.json", 124_439_808),
     ("pythia-160m.json", 162_322_944), ("mistral-7b.json", 7_241_732_096)],
)
def test_hf_config_counts(file: str, published: int) -> None:
    cfg = TransformerConfig(**read_hf_config(HF_DIR / file))
    assert parameter_count(cfg) == published


def test_hf_config_maps_architecture_details() -> None:
    qwen = TransformerConfig(**read_hf_config(HF_DIR / "qwen2-0.5b.json"))
    assert qwen.qkv_bias and not qwen.bias and qwen.tie_embeddings and qwen.kv_heads == 2
    assert any(p.name == "blocks.0.attn.q_proj.bias" for p in parameter_tensors(qwen))
    assert not any(p.name == "blocks.0.attn.o_proj.bias" for p in parameter_tensors(qwen))
    neox = TransformerConfig(**read_hf_config(HF_DIR / "pythia-160m.json"))
    assert neox.parallel_residual and neox.rotary_pct == 0.25 and not neox.tie_embeddings
    gpt2 = TransformerConfig(**read_hf_config(HF_DIR / "gpt2.json"))
    assert gpt2.tie_embeddings and gpt2.positions == "learned" and gpt2.ffn_dim == 3072


def _write(tmp_path: Path, data: object, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_hf_config_directory_and_phi3(tmp_path: Path) -> None:
    phi3 = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32,
            "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32064,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}
    _write(tmp_path, phi3)
    assert parameter_count(TransformerConfig(**read_hf_config(tmp_path))) == 3_821_079_552


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON at line 1"),
        ([1, 2], "expected a JSON object"),
        ({"hidden_size": 8}, "missing key 'model_type'"),
        ({"model_type": "qwen3"}, "unsupported model_type 'qwen3'"),
        ({"model_type": "llama", "hidden_size": 64}, "missing key 'vocab_size'"),
        ({"model_type": "gpt2", "n_embd": "768"}, "missing key 'vocab_size'"),
        ({"model_type": "gpt2", "vocab_size": 10, "n_embd": "768"}, "key 'n_embd' must be int"),
        ({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 8,
          "hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_hf_configs(tmp_path: Path, content: object, message: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(EstimatorError, match=message) as info:
        read_hf_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_hf_file(tmp_path: Path) -> None:
    with pytest.raises(EstimatorError, match="not found"):
        read_hf_config(tmp_path / "nope.json")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_torch_named_parameters_match(name: str) -> None:
    cfg = small(name)
    model = build_transformer(cfg)
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == [(p.name, p.shape) for p in get_family("transformer").parameters(cfg)]
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg)


def test_torch_model_runs_logits_and_loss() -> None:
    cfg = small("llama-gqa")
    model = build_transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 5))
    assert model(idx).shape == (2, 5, cfg.vocab_size)
    loss = model(idx, idx)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_sdpa_and_eager_agree() -> None:
    torch.manual_seed(0)
    for name in ("gpt2", "llama-gqa", "neox"):
        a = build_transformer(small(name))
        b = build_transformer(small(name, attention="eager"))
        b.load_state_dict(a.state_dict())
        idx = torch.randint(0, 97, (2, 7))
        torch.testing.assert_close(a(idx), b(idx), rtol=1e-4, atol=1e-5)
