"""Saved-for-backward tensors: the analytic list against saved_tensors_hooks on the torch model."""

from __future__ import annotations

import itertools

import pytest
import torch

from estimator.config import TrainingConfig
from estimator.families.base import StepShape, get_family
from estimator.families.transformer import activation_bytes, saved_tensors
from estimator.measure.transformer import build_transformer, measure_saved_bytes
from estimator.presets import get_preset

from .conftest import SMALL, small

SHAPES = {"fp32": StepShape(4, 4, 4, False), "bf16": StepShape(2, 2, 2, False),
          "amp-bf16": StepShape(2, 4, 4, True)}
CASES = list(itertools.product(sorted(SMALL), ["sdpa", "eager"], ["none", "full"]))


def _measure(name: str, attention: str, ckpt: str, precision: str) -> tuple[int, TrainingConfig]:
    cfg = small(name, attention=attention)
    training = TrainingConfig(batch_size=2, seq_len=8, activation_checkpointing=ckpt, precision=precision)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build_transformer(cfg, dtype=dtype, activation_checkpointing=ckpt)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    targets = torch.randint(0, cfg.vocab_size, (2, 8))
    autocast = torch.bfloat16 if precision.startswith("amp") else None
    _, seen = measure_saved_bytes(model, idx, targets, autocast)
    return sum(nbytes for _, _, nbytes in seen.values()), training


@pytest.mark.parametrize(("name", "attention", "ckpt"), CASES)
def test_fp32_saved_bytes_equal_activation_elements(name: str, attention: str, ckpt: str) -> None:
    measured, training = _measure(name, attention, ckpt, "fp32")
    cfg = small(name, attention=attention)
    assert measured == 4 * get_family("transformer").activation_elements(cfg, training)


@pytest.mark.parametrize(("name", "attention", "ckpt", "precision"),
                         [(*c, p) for c in CASES for p in ("bf16", "amp-bf16")])
def test_16bit_saved_bytes_by_dtype_class(name: str, attention: str, ckpt: str, precision: str) -> None:
    measured, training = _measure(name, attention, ckpt, precision)
    assert measured == activation_bytes(small(name, attention=attention), training, SHAPES[precision])


def test_korthikanti_shape_for_gpt_like_layer() -> None:
    # Per layer and token, MHA + gelu + layernorm, no checkpointing (docs/transformer.md): x, h, q,
    # k, v, attention output, x_mid, h2 (8d) + up and GELU output (2F = 8d) + 4 norm statistics;
    # eager adds the probabilities (H·S per token), SDPA only its logsumexp (H).
    cfg = get_preset("gpt2").config().model_copy(update={"attention": "eager"})
    one = TrainingConfig(batch_size=1, seq_len=1024)
    layer = [s for s in saved_tensors(cfg, one) if s.layer == 0]
    d, h, s = 768, 12, 1024
    assert sum(t.numel for t in layer) == s * (16 * d + h * s + 4)
    sdpa = get_preset("gpt2").config()
    layer = [t for t in saved_tensors(sdpa, one) if t.layer == 0]
    assert sum(t.numel for t in layer) == s * (16 * d + h + 4)


def test_one_block_times_the_layers_equals_the_sum_over_every_saved_tensor() -> None:
    """``activation_bytes`` sums one block's tensors and multiplies by the layer count; the whole list agrees."""
    from estimator.presets import preset_names

    for name in preset_names():
        cfg = get_preset(name).config()
        if cfg.family != "transformer":
            continue
        for precision, ckpt in itertools.product(SHAPES, ["none", "full"]):
            training = TrainingConfig(batch_size=3, seq_len=64, activation_checkpointing=ckpt, precision=precision)
            listed = saved_tensors(cfg, training)
            shape = SHAPES[precision]
            assert activation_bytes(cfg, training, shape) == sum(s.nbytes(shape) for s in listed), (name, precision)
            assert get_family("transformer").activation_elements(cfg, training) == sum(s.numel for s in listed)
