"""Tiny real Hugging Face MoE models on the CPU (transformers' own classes, grouped_mm and eager experts):
per-layer saved bytes of the MoE block, the rise of each MoE block's forward peak (the allocator's record) and
the step's matmul FLOPs equal the estimate under the measured routing."""

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


def _run_hf(model_type: str, tmp_path: Path, impl: str) -> tuple[MoEConfig, list[int], list[int], int]:
    """Train-mode forward + backward of the HF model; our config (via configs' reader), MoE-block saved
    bytes per layer, the rise of the allocator's live tensor bytes over each MoE block's forward, and
    FlopCounterMode's total."""
    from torch.utils.flop_counter import FlopCounterMode

    from estimator.measure.allocator import profile_allocations
    from estimator.measure.flop_formulas import register_sdpa_flops

    data = {**COMMON, **TYPES[model_type]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": model_type, **data}))
    hf_config = transformers.AutoConfig.for_model(model_type, **data)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(hf_config, experts_implementation=impl,
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

    box: dict = {}

    def enter(i: int) -> None:
        state.update(layer=i)
        box["marks"](f"moe{i}")

    def leave() -> None:
        state.update(layer=None)
        box["marks"]("rest")

    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: enter(i))
        layer.mlp.register_forward_hook(lambda m, a, o: leave())
        layer.mlp.gate.register_forward_hook(
            lambda m, a, o, i=i: counts.__setitem__(i, o[2].flatten().tolist()))

    def run(marks) -> None:  # noqa: ANN001
        box["marks"] = marks
        marks("rest")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=idx, labels=idx).loss.backward()

    trace = profile_allocations(run)
    per_layer = [sum(saved[i].values()) for i in range(len(layers))]
    rise = [max(s.tensors for s in trace.within(f"moe{i}")) - trace.live_before(f"moe{i}").tensors
            for i in range(len(layers))]

    register_sdpa_flops()
    model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=idx, labels=idx).loss.backward()
    values = {k: v for k, v in read_hf_config(path).items() if k != "family"}
    tokens = [[sum(1 for e in counts[i] if e == x) for x in range(E)] for i in range(len(layers))]
    cfg = MoEConfig(**{**values, "experts_implementation": impl,
                       "routing": {"mode": "measured", "tokens_per_expert": tokens}})
    return cfg, per_layer, rise, counter.get_total_flops()


def _block_rise(events: list, i: int) -> int:
    """The estimate's rise of live bytes over MoE block ``i``'s forward (its first to its last event)."""
    inside = [n for n, e in enumerate(events) if e.phase == "forward" and e.name.startswith(f"blocks.{i}.moe.")]
    live = sum(e.nbytes for e in events[:inside[0]])
    start, peak = live, live
    for e in events[inside[0]:inside[-1] + 1]:
        live += e.nbytes
        peak = max(peak, live)
    return peak - start


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_hf_moe_block_saved_bytes_peaks_and_flops(model_type: str, impl: str, tmp_path: Path) -> None:
    cfg, per_layer, rise, flops = _run_hf(model_type, tmp_path, impl)
    training = TrainingConfig(batch_size=B, seq_len=S)
    events = step_events(cfg, training, StepShape(4, 4, 4, False))
    ours = [sum(e.nbytes for e in events if e.nbytes > 0 and e.role == "activation" and e.phase == "forward"
                and (e.name.startswith(f"blocks.{i}.moe.") or e.name == f"blocks.{i}.norm2.out"))
            for i in range(cfg.num_layers)]
    assert ours == per_layer
    assert [_block_rise(events, i) for i in range(cfg.num_layers)] == rise
    assert matmul_flops(cfg, training).total == flops


def _hf_aux_step(model_type: str, tmp_path: Path) -> tuple[MoEConfig, int, int]:
    """HF model with output_router_logits=True: the rise of live tensor bytes while its
    ``load_balancing_loss_func`` runs, and the bytes it leaves (what its graph keeps for backward)."""
    from estimator.measure.allocator import profile_allocations

    module = __import__(f"transformers.models.{model_type}.modeling_{model_type}", fromlist=["x"])
    data = {**COMMON, **TYPES[model_type], "router_aux_loss_coef": 0.02, "output_router_logits": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": model_type, **data}))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **data),
                                                              attn_implementation="sdpa")
    model.train()
    idx = torch.randint(0, COMMON["vocab_size"], (B, S))
    counts: dict[int, list[int]] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, o[2].flatten().tolist()))
    original = module.load_balancing_loss_func
    box: dict = {}

    def marked(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        box["marks"]("aux")
        out = original(*args, **kwargs)
        box["marks"]("after")
        return out

    def run(marks) -> None:  # noqa: ANN001
        box["marks"] = marks
        marks("forward")
        model(input_ids=idx, labels=idx).loss.backward()

    module.load_balancing_loss_func = marked
    try:
        trace = profile_allocations(run)
    finally:
        module.load_balancing_loss_func = original
    start = trace.live_before("aux").tensors
    rise = max(s.tensors for s in trace.within("aux")) - start
    kept = trace.live_before("after").tensors - start
    values = {k: v for k, v in read_hf_config(path).items() if k != "family"}
    assert values["aux_loss_coef"] == 0.02
    tokens = [[sum(1 for e in counts[i] if e == x) for x in range(E)] for i in sorted(counts)]
    cfg = MoEConfig(**{**values, "routing": {"mode": "measured", "tokens_per_expert": tokens}})
    return cfg, rise, kept


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_hf_load_balancing_loss_bytes(model_type: str, tmp_path: Path) -> None:
    """The estimate's events of the aux loss (from its first tensor to the one it returns) against HF's."""
    cfg, rise, kept = _hf_aux_step(model_type, tmp_path)
    events = step_events(cfg, TrainingConfig(batch_size=B, seq_len=S), StepShape(4, 4, 4, False))
    first = next(n for n, e in enumerate(events) if e.name == "aux.tokens_per_expert_sum")
    last = next(n for n, e in enumerate(events) if e.name == "aux.scaled")
    live = peak = 0
    for e in events[first:last]:
        live += e.nbytes
        peak = max(peak, live)
    assert (peak, live) == (rise, kept)
    assert kept == cfg.num_layers * B * S * E * 4 + E * 4 + 4  # each layer's softmax, f and the loss


DEEPSEEK = {**COMMON, "n_routed_experts": E, "moe_intermediate_size": 16, "intermediate_size": 20,
            "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": 8, "kv_lora_rank": 8,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6, "n_group": 2, "topk_group": 1,
            "routed_scaling_factor": 2.5}


def _peaks(run: object) -> tuple[int, int, int]:
    """(forward peak, backward peak, end of forward) of ``run(marks)``: the allocator's ATen-op blocks."""
    from estimator.measure.allocator import profile_allocations

    trace = profile_allocations(run)
    base = trace.live_before("forward").tensors
    return (max(s.tensors for s in trace.within("forward")) - base,
            max(s.tensors for s in trace.within("backward")) - base, trace.live_before("backward").tensors - base)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepseek_v3_step_equals_ours(tmp_path: Path, dtype: str) -> None:
    """DeepseekV3ForCausalLM's real step (MLA with v unpadded, the sigmoid router, the DynamicCache, its loss) and
    our module built from the same config.json (``deepseek_transformers``): equal to the byte."""
    from estimator.measure.moe import build_moe

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", **DEEPSEEK}))
    values = read_hf_config(tmp_path)
    values.pop("family")
    cfg = MoEConfig(**values)
    assert cfg.deepseek_transformers and cfg.kv_cache
    dt = getattr(torch, dtype)
    idx = torch.randint(0, COMMON["vocab_size"], (B, S))

    def hf(marks) -> None:  # noqa: ANN001
        marks("build")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model("deepseek_v3", **DEEPSEEK), attn_implementation="sdpa").to(dt)
        model.train()
        marks("forward")
        loss = model(input_ids=idx, labels=idx).loss
        marks("backward")
        loss.backward()
        marks("end")

    def ours(marks) -> None:  # noqa: ANN001
        marks("build")
        model = build_moe(cfg, dtype=dt)
        marks("forward")
        loss = model(idx, idx)
        marks("backward")
        loss.backward()
        marks("end")

    assert _peaks(ours) == _peaks(hf)
