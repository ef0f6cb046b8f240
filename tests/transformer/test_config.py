"""TransformerConfig validation and the sequence-length rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from estimator.config import TrainingConfig
from estimator.errors import EstimatorError
from estimator.families.transformer import TransformerConfig, tokens_per_sequence


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_model": 30, "num_heads": 4}, "d_model \\(30\\) must be divisible by num_heads \\(4\\)"),
        ({"num_heads": 12, "num_kv_heads": 5}, "num_heads \\(12\\) must be a multiple of num_kv_heads"),
        ({"mlp": "swiglu"}, "d_ff must be given for mlp: swiglu"),
        ({"positions": "rope", "rotary_pct": 0.01}, "rotary dims per head"),
        ({"rotary_pct": 0.5}, "rotary_pct applies to positions: rope only"),
        ({"num_layers": 0}, "greater than 0"),
        ({"unknown": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_configs(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TransformerConfig(**fields)


def test_defaults_are_gpt2_small_and_derived_sizes() -> None:
    cfg = TransformerConfig()
    assert (cfg.kv_heads, cfg.head_size, cfg.ffn_dim, cfg.rotary_dim) == (12, 64, 3072, 0)
    gqa = TransformerConfig(d_model=64, num_heads=8, num_kv_heads=2, head_dim=16, positions="rope",
                            rotary_pct=0.5)
    assert (gqa.kv_heads, gqa.head_size, gqa.rotary_dim) == (2, 16, 8)


def test_schema_has_descriptions() -> None:
    schema = TransformerConfig.model_json_schema()
    assert all(prop.get("description") for name, prop in schema["properties"].items() if name != "family")


def test_seq_len_defaults_to_max_and_is_bounded() -> None:
    cfg = TransformerConfig(max_seq_len=128)
    assert tokens_per_sequence(cfg, TrainingConfig(batch_size=2)) == 128
    assert tokens_per_sequence(cfg, TrainingConfig(batch_size=2, seq_len=64)) == 64
    with pytest.raises(EstimatorError, match="training.seq_len: 256 exceeds the model's max_seq_len 128"):
        tokens_per_sequence(cfg, TrainingConfig(seq_len=256))
