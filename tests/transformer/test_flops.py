"""The analytic matmul count equals FlopCounterMode on one CPU training step of the torch model."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from estimator.config import TrainingConfig
from estimator.families.base import get_family
from estimator.families.transformer import flop_parameters, matmul_flops, parameter_count
from estimator.measure.flop_formulas import count_step_flops, register_sdpa_flops
from estimator.measure.transformer import build_transformer
from estimator.presets import get_preset

from .conftest import small

CASES = list(itertools.product(["gpt2", "llama-gqa", "qwen2", "neox"], ["sdpa", "eager"], ["none", "full"]))


@pytest.mark.parametrize(("name", "attention", "ckpt"), CASES)
def test_matmul_flops_equal_flop_counter(name: str, attention: str, ckpt: str) -> None:
    cfg = small(name, attention=attention)
    training = TrainingConfig(batch_size=2, seq_len=7, activation_checkpointing=ckpt)
    torch.manual_seed(0)
    model = build_transformer(cfg, activation_checkpointing=ckpt)
    idx = torch.randint(0, cfg.vocab_size, (2, 7))
    measured = count_step_flops(model, idx, idx)
    exact = matmul_flops(cfg, training)
    assert measured.forward == exact.forward
    assert measured.backward == exact.backward + exact.recompute
    flops = get_family("transformer").flops(cfg, training)
    assert flops.matmul == measured.total and flops.matmul_forward == measured.forward


def test_register_sdpa_flops_is_idempotent_and_counts_cpu_kernel() -> None:
    register_sdpa_flops()
    register_sdpa_flops()
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    # forward 4·B·H·S²·h, backward 10·B·H·S²·h (torch's formula, causal mask not discounted)
    assert counter.get_total_flops() == 14 * 1 * 2 * 4 * 4 * 8


def test_six_n_d_rule_and_attention_term() -> None:
    cfg = get_preset("gpt2").config()
    training = TrainingConfig(batch_size=8, seq_len=1024)
    flops = get_family("transformer").flops(cfg, training)
    tokens = 8 * 1024
    n = flop_parameters(cfg)
    # N = all parameters - embeddings (wte, wpe) + the (tied) head matrix
    assert n == parameter_count(cfg) - 1024 * 768
    attention = 12 * 12 * 12 * 64 * 1024 * tokens  # 12·L·H·Q·T per token (PaLM appendix B)
    assert flops.attention == attention
    assert flops.per_step == 6 * n * tokens + attention
    assert flops.forward * 2 == flops.backward


def test_matmul_without_biases_is_six_nd_eager() -> None:
    # Eager attention, no biases/norm weights in N: the exact count is the rule itself.
    cfg = small("llama-gqa", attention="eager")
    training = TrainingConfig(batch_size=2, seq_len=8)
    flops = get_family("transformer").flops(cfg, training)
    norm_params = (2 * cfg.num_layers + 1) * cfg.d_model
    assert flops.matmul == flops.per_step - 6 * norm_params * 16


def test_checkpointing_adds_recompute_only_to_matmul() -> None:
    cfg = small("gpt2")
    plain = get_family("transformer").flops(cfg, TrainingConfig(batch_size=2, seq_len=8))
    ckpt = get_family("transformer").flops(cfg, TrainingConfig(batch_size=2, seq_len=8,
                                                                activation_checkpointing="full"))
    assert (plain.forward, plain.backward) == (ckpt.forward, ckpt.backward)
    assert ckpt.matmul - plain.matmul == matmul_flops(cfg, TrainingConfig(
        batch_size=2, seq_len=8, activation_checkpointing="full")).recompute > 0
