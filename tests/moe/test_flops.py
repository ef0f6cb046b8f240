"""FLOPs: the 6·N_active·T rule by hand, routing by hand, and the exact matmul count against
FlopCounterMode on our torch module under the routing the step had."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from estimator.config import TrainingConfig
from estimator.families.base import get_family
from estimator.families.moe import MoEConfig, expert_tokens, matmul_flops
from estimator.measure.flop_formulas import register_sdpa_flops
from estimator.measure.moe import build_moe
from estimator.presets import get_preset

from .conftest import DEEPSEEK_HF, SMALL, small

FAMILY = get_family("moe")


def test_mixtral_rule_by_hand() -> None:
    """N_active = 12,879,925,248 active less the 32000 x 4096 embedding lookup; T = 2 x 4096."""
    cfg = get_preset("mixtral-8x7b").config()
    training = TrainingConfig(batch_size=2, seq_len=4096)
    f = FAMILY.flops(cfg, training)
    n, t = 12_879_925_248 - 32000 * 4096, 2 * 4096
    attention = 32 * 2 * 2 * 32 * 4096 * 4096 * (128 + 128)  # L · 2·B·H·S²·(h_qk + h_v), forward
    assert (f.rule_parameters, f.tokens) == (n, t) == (12_748_853_248, 8192)
    assert f.forward == 2 * n * t + attention
    assert f.backward == 4 * n * t + 2 * attention
    assert f.attention == 3 * attention


def test_routing_modes_by_hand() -> None:
    cfg = small("mixtral")  # E = 4, k = 2, two MoE layers
    training = TrainingConfig(batch_size=3, seq_len=5)  # T = 15, T·k = 30
    assert expert_tokens(cfg, training) == [[8, 8, 7, 7]] * 2
    capacity = small("mixtral", routing={"mode": "capacity", "capacity_factor": 1.25})
    assert expert_tokens(capacity, training) == [[math.ceil(1.25 * 30 / 4)] * 4] * 2 == [[10] * 4] * 2
    worst = small("mixtral", routing={"mode": "worst"})
    assert expert_tokens(worst, training) == [[15, 15, 0, 0]] * 2


def test_experts_flops_do_not_depend_on_balance_but_on_capacity() -> None:
    training = TrainingConfig(batch_size=3, seq_len=5)
    base = matmul_flops(small("mixtral"), training).total
    assert matmul_flops(small("mixtral", routing={"mode": "worst"}), training).total == base
    padded = matmul_flops(small("mixtral", routing={"mode": "capacity", "capacity_factor": 1.25}), training).total
    per_token = 2 * 3 * 8 * 8 * 3  # 2 FLOPs x 3 matrices x d x F, forward + backward (x3), per extra slot
    assert padded - base == 2 * (40 - 30) * per_token  # two MoE layers, 10 padded slots each


def test_measured_counts_must_add_up() -> None:
    from estimator.errors import EstimatorError

    cfg = small("mixtral", routing={"mode": "measured", "tokens_per_expert": [[1, 1, 1, 1]]})
    with pytest.raises(EstimatorError, match="sum to 4, expected B·S·k = 30"):
        expert_tokens(cfg, TrainingConfig(batch_size=3, seq_len=5))


@pytest.mark.parametrize(("name", "ckpt"),
                         list(itertools.product([*sorted(SMALL), "deepseek-v3+hf"], ["none", "full"])))
def test_matmul_count_equals_flop_counter(name: str, ckpt: str) -> None:
    """(deepseek-v3+hf: transformers' MLA, whose v is not padded: SDPA's math kernel, two bmms forward, four back.)"""
    register_sdpa_flops()
    cfg = small(name.removesuffix("+hf"), **(DEEPSEEK_HF if name.endswith("+hf") else {}))
    torch.manual_seed(0)
    model = build_moe(cfg, activation_checkpointing=ckpt)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    targets = torch.randint(0, cfg.vocab_size, (2, 8))
    with FlopCounterMode(display=False) as counter:
        model(idx, targets).backward()
    routed = MoEConfig(**{**cfg.model_dump(), "routing": {"mode": "measured",
                                                          "tokens_per_expert": model.tokens_per_expert}})
    training = TrainingConfig(batch_size=2, seq_len=8, activation_checkpointing=ckpt)
    assert matmul_flops(routed, training).total == counter.get_total_flops()
