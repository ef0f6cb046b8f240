"""Tiny real Hugging Face MoE models on the CPU (transformers' own classes, eager experts): per-layer
saved bytes of the MoE block and the step's matmul FLOPs equal the estimate under the measured routing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from estimator.config import TrainingConfig
from estimator.families.base import StepShape
from estimator.families.moe import MoEConfig, matmul_flops
from estimator.families.moe_events import step_events
from estimator.hf_config import read_hf_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

B, S, E = 2, 8, 4
COMMON = {"vocab_size": 61, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts_per_tok": 2,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
TYPES = {
    "mixtral": {"num_local_experts": E, "intermediate_size": 12},
    "qwen2_moe": {"num_experts": E, "moe_intermediate_size": 12, "shared_expert_intermediate_size": 10,
                  "intermediate_size": 20, "norm_topk_prob": False},
    "qwen3_moe": {"num_experts": E, "moe_intermediate_size": 12, "intermediate_size": 20, "head_dim": 8,
                  "norm_topk_prob": True},
    "olmoe": {"num_experts": E, "intermediate_size": 12, "norm_topk_prob": False},
}


def _run_hf(model_type: str, tmp_path: Path) -> tuple[MoEConfig, list[int], int]:
    """Train-mode forward + backward of the HF model; our config (via configs' reader), MoE-block saved
    bytes per layer, and FlopCounterMode's total."""
    from torch.utils.flop_counter import FlopCounterMode

    from estimator.measure.flop_formulas import register_sdpa_flops

    data = {**COMMON, **TYPES[model_type]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": model_type, **data}))
    hf_config = transformers.AutoConfig.for_model(model_type, **data)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(hf_config, experts_implementation="eager",
                                                              attn_implementation="sdpa")
    model.train()
    idx = torch.randint(0, COMMON["vocab_size"], (B, S))
    layers = model.model.layers
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state: dict = {"layer": None}
    saved: dict[int, dict[int, int]] = {}
    counts: dict[int, list[int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if state["layer"] is not None and ptr not in params:
            saved.setdefault(state["layer"], {})[ptr] = t.untyped_storage().nbytes()
        return t

    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: state.update(layer=i))
        layer.mlp.register_forward_hook(lambda m, a, o: state.update(layer=None))
        layer.mlp.gate.register_forward_hook(
            lambda m, a, o, i=i: counts.__setitem__(i, torch.bincount(o[2].flatten(), minlength=E).tolist()))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=idx, labels=idx).loss.backward()
    per_layer = [sum(saved[i].values()) for i in range(len(layers))]

    register_sdpa_flops()
    model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=idx, labels=idx).loss.backward()
    values = {k: v for k, v in read_hf_config(path).items() if k != "family"}
    cfg = MoEConfig(**{**values, "routing": {"mode": "measured",
                                             "tokens_per_expert": [counts[i] for i in range(len(layers))]}})
    return cfg, per_layer, counter.get_total_flops()


@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_hf_moe_block_saved_bytes_and_flops(model_type: str, tmp_path: Path) -> None:
    cfg, per_layer, flops = _run_hf(model_type, tmp_path)
    training = TrainingConfig(batch_size=B, seq_len=S)
    events = step_events(cfg, training, StepShape(4, 4, 4, False))
    ours = [sum(e.nbytes for e in events if e.nbytes > 0 and e.role == "activation" and e.phase == "forward"
                and (e.name.startswith(f"blocks.{i}.moe.") or e.name == f"blocks.{i}.norm2.out"))
            for i in range(cfg.num_layers)]
    assert ours == per_layer
    assert matmul_flops(cfg, training).total == flops
