"""The mixture-of-experts transformer family: Mixtral, Qwen1.5/2/3-MoE, OLMoE, DeepSeek-V2/V3 as one config.

Pure Python (no torch). A decoder-only transformer (``transformer.py``'s attention, norms, RoPE and
head, reused through :meth:`MoEConfig.dense_view`) whose MLP is, in its MoE layers, a router and
``num_experts`` SwiGLU experts of which each token uses ``experts_per_token``, plus optional shared
experts (DeepSeek, Qwen2-MoE) and, before the first MoE layer, ``first_dense_layers`` dense blocks
(DeepSeek's ``first_k_dense_replace``). Attention is grouped-query (optionally with q/k RMSNorms,
Qwen3/OLMoE) or DeepSeek's multi-head latent attention (MLA, DeepSeek-V2 paper section 2.1): v padded to
the q/k head size (the presets), or, with ``deepseek_transformers`` (an hf_config of deepseek_v3), as
transformers 5.24's ``DeepseekV3Attention`` runs it (v not padded: SDPA's math kernel on the CPU) with its
``DeepseekV3TopkRouter`` (docs/moe.md).

Routing is data-dependent, so it is an explicit, stated input (:class:`RoutingConfig`): balanced
(B·S·k/E tokens per expert), a capacity factor (Switch Transformer, Fedus et al. 2021 section 2.2),
the worst case (every token picks the same k experts), or measured counts per layer.

Every number describes the project's own torch implementation ``estimator.measure.moe``, which runs
the routed experts as transformers 5 does: ``experts_implementation="grouped_mm"`` (its default: the
T·k pairs sorted by expert, two ``torch.nn.functional.grouped_mm`` over the 3-D weights) or ``"eager"``
(``MixtralExperts.forward``: a loop over the experts hit by at least one token); see docs/moe.md.
Notation: T = B·S tokens, d = d_model, E experts, k experts per token, F expert width, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from estimator.config import MAX_LAYERS, StrictModel, TrainingConfig
from estimator.errors import EstimatorError
from estimator.events import Event, alloc, free
from estimator.families.base import BatchInForce, FlopCount, ParamTensor, StepShape, register_family
from estimator.families.memo import per_model
from estimator.families.transformer import TransformerConfig


class RoutingConfig(StrictModel):
    """How many tokens each expert receives in one step (the assumption every MoE figure rests on)."""

    mode: Literal["balanced", "capacity", "worst", "measured"] = Field(
        "balanced",
        description="balanced: B·S·k/E tokens per expert | capacity: every expert processes "
        "ceil(capacity_factor·B·S·k/E) slots (a padded, token-dropping dispatch) | worst: every token picks "
        "the same k experts | measured: tokens_per_expert",
    )
    capacity_factor: float = Field(1.25, gt=0, description="Switch Transformer's capacity factor (mode: capacity)")
    tokens_per_expert: list[list[int]] | None = Field(
        None, description="mode measured: per MoE layer, the tokens each expert received (one list = every layer)"
    )

    @model_validator(mode="after")
    def _check(self) -> RoutingConfig:
        if self.mode == "measured" and not self.tokens_per_expert:
            raise ValueError("mode 'measured' needs tokens_per_expert (one list of counts per MoE layer)")
        if self.tokens_per_expert and self.mode != "measured":
            raise ValueError("tokens_per_expert applies to mode: measured only")
        for counts in self.tokens_per_expert or []:
            if any(c < 0 for c in counts):
                raise ValueError("tokens_per_expert: counts must be >= 0")
        return self


class MoEConfig(StrictModel):
    """A decoder-only MoE transformer; the defaults are a small Mixtral-shaped model."""

    family: Literal["moe"] = "moe"
    vocab_size: int = Field(32000, gt=0, description="V, the vocabulary size")
    d_model: int = Field(1024, gt=0, description="d, the width of the residual stream")
    num_layers: int = Field(8, gt=0, le=MAX_LAYERS, description="L, the number of blocks (dense and MoE)")
    num_heads: int = Field(16, gt=0, description="H, attention (query) heads")
    num_kv_heads: int | None = Field(None, gt=0, description="K, key/value heads (GQA); null = num_heads")
    head_dim: int | None = Field(None, gt=0, description="h, the size of one head; null = d_model / num_heads")
    qkv_bias: bool = Field(False, description="biases on the q/k/v projections (Qwen1.5/2-MoE)")
    qk_norm: Literal["none", "head", "full"] = Field(
        "none", description="RMSNorm of q and k: head (per head, Qwen3-MoE) | full (over all heads, OLMoE)"
    )
    attention_type: Literal["gqa", "mla"] = Field("gqa", description="gqa | mla (DeepSeek-V2/V3 latent attention)")
    q_lora_rank: int | None = Field(None, gt=0, description="MLA: rank of the query compression; null = no compression")
    kv_lora_rank: int = Field(512, gt=0, description="MLA: rank of the joint key/value compression")
    qk_nope_head_dim: int = Field(128, gt=0, description="MLA: per-head query/key dims without RoPE")
    qk_rope_head_dim: int = Field(64, gt=0, description="MLA: per-head query/key dims with RoPE (key shared by heads)")
    v_head_dim: int = Field(128, gt=0, description="MLA: per-head value dims")
    d_ff: int | None = Field(None, gt=0, description="the dense layers' SwiGLU width (needed if any)")
    num_experts: int = Field(8, gt=0, description="E, routed experts per MoE layer")
    experts_per_token: int = Field(2, gt=0, description="k, routed experts each token uses")
    expert_d_ff: int = Field(3584, gt=0, description="F, one routed expert's SwiGLU width")
    shared_expert_d_ff: int = Field(
        0, ge=0, description="width of the shared-expert SwiGLU, run on every token (0: none; DeepSeek: n_shared·F)"
    )
    shared_expert_gate: bool = Field(False, description="a sigmoid gate (d -> 1) on the shared expert (Qwen2-MoE)")
    first_dense_layers: int = Field(0, ge=0, description="dense blocks before the first MoE block (DeepSeek)")
    moe_layer_step: int = Field(1, gt=0, description="a block i >= first_dense_layers is MoE iff (i+1) % step == 0")
    router: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="softmax over experts then top-k (Mixtral, Qwen, OLMoE) | sigmoid scores (DeepSeek-V3)"
    )
    router_fp32: bool = Field(False, description="router logits computed from fp32 copies of input and weight "
                              "(DeepSeek-V3); otherwise in the model dtype and softmaxed in fp32")
    norm_topk_prob: bool = Field(True, description="renormalise the k chosen weights to sum to 1")
    routed_scaling_factor: float = Field(1.0, gt=0, description="scale of the routed weights (DeepSeek-V3)")
    n_group: int = Field(1, gt=0, description="DeepSeek-V3 group-limited routing: expert groups")
    topk_group: int = Field(1, gt=0, description="DeepSeek-V3: groups a token may route to")
    aux_loss_coef: float = Field(
        0.0, ge=0, description="Switch load-balancing loss coefficient α (0: not computed, transformers' "
        "default output_router_logits=false)"
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="tokens per expert (an assumption)")
    experts_implementation: Literal["grouped_mm", "eager"] = Field(
        "grouped_mm", description="how the routed experts run, as transformers 5 names it: grouped_mm (its "
        "default: pairs sorted by expert, two grouped GEMMs) | eager (a loop over the experts hit)"
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency θ")
    max_seq_len: int = Field(4096, gt=0, description="the longest sequence")
    tie_embeddings: bool = Field(False, description="the output head reuses the token embedding matrix")
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="the attention kernel (see the transformer family)")
    norm_eps: float = Field(1e-5, gt=0, description="ε of the RMSNorms")
    loss_upcast: bool = Field(False, description="transformers' loss: logits.float() first (docs/transformer.md)")
    labels_from_inputs: bool = Field(False, description="transformers' loss: the labels are the input ids, shifted "
                                     "in the loss (docs/transformer.md)")
    rope_buffers: bool = Field(False, description="transformers' rotary inv_freq buffers (docs/transformer.md)")
    rope_stream_dtype: bool = Field(False, description="transformers' rotary cos/sin dtype; with mla only with "
                                    "deepseek_transformers (docs/transformer.md)")
    kv_cache: bool = Field(False, description="transformers' training-time DynamicCache (with mla only with "
                           "deepseek_transformers: the compressed latents are cached) (docs/transformer.md)")
    deepseek_transformers: bool = Field(
        False, description="MLA and the sigmoid router as transformers 5.24 writes them (DeepseekV3Attention: "
        "v not padded, so the CPU runs SDPA's math kernel; DeepseekV3TopkRouter); an hf_config of deepseek_v3 "
        "sets it (docs/moe.md)")
    rope_interleave: bool = Field(True, description="deepseek_transformers: RoPE on interleaved pairs "
                                  "(transformers' apply_rotary_pos_emb_interleave) rather than rotate-half")

    @model_validator(mode="after")
    def _check_shapes(self) -> MoEConfig:
        mla_padded = self.attention_type == "mla" and not self.deepseek_transformers
        if (self.rope_stream_dtype or self.kv_cache) and mla_padded:
            raise ValueError("rope_stream_dtype and kv_cache are modelled for attention_type: mla only with "
                             "deepseek_transformers")
        if self.deepseek_transformers and (self.attention_type != "mla" or self.router != "sigmoid"):
            raise ValueError("deepseek_transformers needs attention_type: mla and router: sigmoid")
        if self.attention_type == "gqa" and self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}), "
                             "or give head_dim")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.first_dense_layers and self.d_ff is None:
            raise ValueError("d_ff must be given when first_dense_layers > 0 (the dense blocks' width)")
        if self.first_dense_layers >= self.num_layers:
            raise ValueError(f"first_dense_layers ({self.first_dense_layers}) must be below num_layers")
        if self.moe_layer_step > 1 and self.d_ff is None:
            raise ValueError("d_ff must be given when moe_layer_step > 1 (the dense blocks' width)")
        if self.attention_type == "mla":
            if self.qk_norm != "none" or self.qkv_bias:
                raise ValueError("attention_type mla takes no qk_norm or qkv_bias")
            if self.qk_rope_head_dim % 2:
                raise ValueError("qk_rope_head_dim must be even")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError("num_experts must be a multiple of n_group, and topk_group at most n_group")
        given = self.routing.tokens_per_expert or []
        if len(given) not in (0, 1, len(self.moe_layers)):
            raise ValueError(f"routing.tokens_per_expert: expected 1 or {len(self.moe_layers)} lists (one per MoE "
                             f"layer), got {len(given)}")
        for n, counts in enumerate(given):
            if len(counts) != self.num_experts:
                raise ValueError(f"routing.tokens_per_expert.{n}: expected {self.num_experts} counts (num_experts), "
                                 f"got {len(counts)}")
        return self

    # --- derived sizes ------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        """h of GQA attention; MLA's query/key head is qk_nope + qk_rope."""
        if self.attention_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.d_model // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense_layers and (i + 1) % self.moe_layer_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def dense_view(self) -> TransformerConfig:
        """The dense transformer with this model's attention, norms, RoPE and head (a Llama-style block).

        The transformer family's pieces (parameters of attention and norms, the event simulation of
        attention, norms and RoPE) are reused through it; ``d_ff`` is the dense blocks' width.
        """
        rotary = self.qk_rope_head_dim if self.attention_type == "mla" else self.head_size
        return TransformerConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.kv_heads, head_dim=rotary if self.attention_type == "mla" else self.head_size,
            d_ff=self.d_ff or self.expert_d_ff, mlp="swiglu", norm="rmsnorm", bias=False, qkv_bias=self.qkv_bias,
            positions="rope", rope_theta=self.rope_theta, max_seq_len=self.max_seq_len,
            tie_embeddings=self.tie_embeddings, attention=self.attention, norm_eps=self.norm_eps,
            loss_upcast=self.loss_upcast, labels_from_inputs=self.labels_from_inputs, rope_buffers=self.rope_buffers,
            rope_stream_dtype=self.rope_stream_dtype, kv_cache=self.kv_cache,
        )


def tokens_per_sequence(model: MoEConfig, training: TrainingConfig) -> int:
    """S: ``training.seq_len``, or ``model.max_seq_len`` when it is not given."""
    seq = training.seq_len if training.seq_len is not None else model.max_seq_len
    if seq > model.max_seq_len:
        raise EstimatorError(f"training.seq_len: {seq} exceeds the model's max_seq_len {model.max_seq_len}")
    return seq


# --------------------------------------------------------------------------------------------
# Routing


def expert_tokens(model: MoEConfig, training: TrainingConfig) -> list[list[int]]:
    """Tokens each routed expert processes, per MoE layer (in ``model.moe_layers`` order).

    balanced: the T·k assignments spread evenly (the remainder to the first experts); capacity:
    every expert processes C = ceil(cf·T·k/E) slots, Switch Transformer's expert capacity (section
    2.2; padded slots computed, overflow dropped); worst: all T tokens pick experts 0..k-1;
    measured: the given counts, which must sum to T·k per layer (a dropless router assigns each
    token exactly k experts).
    """
    r, e, k = model.routing, model.num_experts, model.experts_per_token
    t = training.batch_size * tokens_per_sequence(model, training)
    layers = len(model.moe_layers)
    if r.mode == "balanced":
        q, rem = divmod(t * k, e)
        counts = [q + 1] * rem + [q] * (e - rem)
        return [list(counts) for _ in range(layers)]
    if r.mode == "capacity":
        return [[math.ceil(r.capacity_factor * t * k / e)] * e for _ in range(layers)]
    if r.mode == "worst":
        return [[t] * k + [0] * (e - k) for _ in range(layers)]
    given = r.tokens_per_expert or []
    # one list for every layer; a shortened copy of the model (``simulate``'s periodic probe) takes the first
    given = given * layers if len(given) == 1 else given[:layers]
    for n, counts in enumerate(given):
        if sum(counts) != t * k:
            raise EstimatorError(f"model.routing.tokens_per_expert.{n}: counts sum to {sum(counts)}, expected "
                                 f"B·S·k = {t * k}")
        if max(counts) > t:
            raise EstimatorError(f"model.routing.tokens_per_expert.{n}: an expert cannot get more than "
                                 f"B·S = {t} tokens")
    return [list(c) for c in given]


def routing_assumption(model: MoEConfig, training: TrainingConfig) -> str:
    """One sentence stating the routing the figures assume (printed with every MoE estimate)."""
    r, e, k = model.routing, model.num_experts, model.experts_per_token
    t = training.batch_size * tokens_per_sequence(model, training)
    if r.mode == "balanced":
        what = f"balanced routing: B·S·k/E = {t}·{k}/{e} = {t * k / e:g} tokens per expert"
    elif r.mode == "capacity":
        c = math.ceil(r.capacity_factor * t * k / e)
        what = f"capacity factor {r.capacity_factor:g}: every expert processes C = ceil(cf·B·S·k/E) = {c} slots"
    elif r.mode == "worst":
        what = f"worst-case routing: all {t} tokens pick the same {k} experts"
    else:
        counts = expert_tokens(model, training)
        what = f"measured routing: the busiest expert gets {max(max(c) for c in counts)} of {t} tokens"
    how = ("a loop over the experts hit" if model.experts_implementation == "eager"
           else "the T·k pairs sorted by expert, two grouped GEMMs")
    return f"{what}; experts as transformers' experts_implementation='{model.experts_implementation}' ({how})"


# --------------------------------------------------------------------------------------------
# Parameters


def _linear(prefix: str, n_in: int, n_out: int, bias: bool = False) -> list[ParamTensor]:
    out = [ParamTensor(f"{prefix}.weight", (n_out, n_in))]
    return out + ([ParamTensor(f"{prefix}.bias", (n_out,))] if bias else [])


def _swiglu(prefix: str, d: int, f: int) -> list[ParamTensor]:
    return (_linear(f"{prefix}.gate_proj", d, f) + _linear(f"{prefix}.up_proj", d, f)
            + _linear(f"{prefix}.down_proj", f, d))


def attention_tensors(model: MoEConfig, p: str) -> list[ParamTensor]:
    """One block's attention parameters (GQA as Llama/Qwen, plus q/k norms; or MLA).

    MLA (DeepSeek-V2 section 2.1.2, HF ``DeepseekV3Attention``): q = W_qb·norm(W_qa·x) (or W_q·x
    without ``q_lora_rank``), [c_kv, k_rope] = W_kva·x, [k_nope, v] = W_kvb·norm(c_kv), o = W_o·attn.
    """
    d, hq, hk, h = model.d_model, model.num_heads, model.kv_heads, model.head_size
    a = f"{p}.attn"
    if model.attention_type == "mla":
        qk, rope = model.head_size, model.qk_rope_head_dim
        out: list[ParamTensor] = []
        if model.q_lora_rank:
            out += _linear(f"{a}.q_a_proj", d, model.q_lora_rank)
            out.append(ParamTensor(f"{a}.q_a_norm.weight", (model.q_lora_rank,)))
            out += _linear(f"{a}.q_b_proj", model.q_lora_rank, hq * qk)
        else:
            out += _linear(f"{a}.q_proj", d, hq * qk)
        out += _linear(f"{a}.kv_a_proj", d, model.kv_lora_rank + rope)
        out.append(ParamTensor(f"{a}.kv_a_norm.weight", (model.kv_lora_rank,)))
        out += _linear(f"{a}.kv_b_proj", model.kv_lora_rank, hq * (model.qk_nope_head_dim + model.v_head_dim))
        return out + _linear(f"{a}.o_proj", hq * model.v_head_dim, d)
    out = (_linear(f"{a}.q_proj", d, hq * h, model.qkv_bias) + _linear(f"{a}.k_proj", d, hk * h, model.qkv_bias)
           + _linear(f"{a}.v_proj", d, hk * h, model.qkv_bias) + _linear(f"{a}.o_proj", hq * h, d))
    if model.qk_norm == "head":
        out += [ParamTensor(f"{a}.q_norm.weight", (h,)), ParamTensor(f"{a}.k_norm.weight", (h,))]
    elif model.qk_norm == "full":
        out += [ParamTensor(f"{a}.q_norm.weight", (hq * h,)), ParamTensor(f"{a}.k_norm.weight", (hk * h,))]
    return out


def moe_tensors(model: MoEConfig, p: str) -> list[ParamTensor]:
    """One MoE block's router, routed experts (3-D, as transformers >= 5 stores them) and shared expert."""
    d, e, f = model.d_model, model.num_experts, model.expert_d_ff
    m = f"{p}.moe"
    experts = [ParamTensor(f"{m}.experts.gate_up_proj", (e, 2 * f, d)),
               ParamTensor(f"{m}.experts.down_proj", (e, d, f))]
    router = [ParamTensor(f"{m}.router.weight", (e, d))]
    out = experts + router if model.deepseek_transformers else router + experts  # DeepseekV3MoE: experts first
    if model.shared_expert_d_ff:
        out += _swiglu(f"{m}.mlp", d, model.shared_expert_d_ff)
        if model.shared_expert_gate:
            out += _linear(f"{m}.shared_gate", d, 1)
    return out


@per_model
def parameter_tensors(model: MoEConfig) -> list[ParamTensor]:
    """Every parameter by name and shape, in ``named_parameters()`` order of ``estimator.measure.moe``."""
    d, v = model.d_model, model.vocab_size
    out = [ParamTensor("tok_emb.weight", (v, d))]
    for i in range(model.num_layers):
        p = f"blocks.{i}"
        norms = [ParamTensor(f"{p}.norm1.weight", (d,)), ParamTensor(f"{p}.norm2.weight", (d,))]
        ff = moe_tensors(model, p) if model.is_moe_layer(i) else _swiglu(f"{p}.mlp", d, model.d_ff or 0)
        if model.deepseek_transformers:  # DeepseekV3DecoderLayer: attention, MLP, then the two norms
            out += attention_tensors(model, p) + ff + norms
        else:
            out += [norms[0], *attention_tensors(model, p), norms[1], *ff]
    out.append(ParamTensor("norm_f.weight", (d,)))
    if not model.tie_embeddings:
        out.append(ParamTensor("lm_head.weight", (v, d)))
    return out


def parameter_count(model: MoEConfig) -> int:
    """Total parameters (every expert; a tied head counted once)."""
    return sum(p.numel for p in parameter_tensors(model))


def idle_expert_parameters(model: MoEConfig) -> int:
    """Parameters of the E - k routed experts a token does not use, summed over the MoE layers."""
    per_expert = 3 * model.d_model * model.expert_d_ff
    return len(model.moe_layers) * (model.num_experts - model.experts_per_token) * per_expert


def active_parameter_count(model: MoEConfig) -> int:
    """Parameters one token uses: all but the idle routed experts (embedding and head included).

    The convention of the model cards (Mixtral 12.9B of 46.7B, DeepSeek-V3 37B of 671B).
    """
    return parameter_count(model) - idle_expert_parameters(model)


def flop_parameters(model: MoEConfig) -> int:
    """N_active of the 6·N·T rule: active parameters less the embedding lookup, plus a tied head matrix."""
    head = model.vocab_size * model.d_model if model.tie_embeddings else 0
    return active_parameter_count(model) - model.vocab_size * model.d_model + head


# --------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class MoEMatmuls:
    """Exact matmul FLOPs of one step of ``estimator.measure.moe`` under the assumed routing."""

    forward: int
    backward: int
    recompute: int

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute


def _attention_weights(model: MoEConfig) -> int:
    """Multiply-adds per token of one block's attention projections."""
    return sum(p.numel for p in attention_tensors(model, "b") if p.name.endswith("weight") and len(p.shape) == 2)


def _score_dims(model: MoEConfig) -> tuple[int, int]:
    """(query/key head size, value head size) of the attention scores."""
    if model.attention_type == "mla":
        return model.head_size, model.v_head_dim
    return model.head_size, model.head_size


def matmul_flops(model: MoEConfig, training: TrainingConfig) -> MoEMatmuls:
    """Every matmul FLOP (2 per multiply-add) FlopCounterMode counts in one step, under the routing.

    Per block: attention projections 2·T·W forward and 4·T·W backward; scores QKᵀ and P·V
    2·B·H·S²·(h_qk + h_v) forward, backward (sdpa) 2·B·H·S²·(3·h_qk + 2·h_v) (torch's
    ``sdpa_backward_flop``, which recomputes QKᵀ) or (eager) twice the forward. Dense blocks'
    SwiGLU 3·d·F_dense per token. MoE blocks: the router 2·T·d·E, the shared expert 3·d·F_s
    (and its gate d), and each routed expert e with n_e tokens 2·n_e·3·d·F forward — so Σ n_e = T·k
    makes the experts' total independent of how balanced the routing is (only capacity padding
    changes it). Backward doubles every linear. The head 2·T·d·V. MLA's v is zero-padded to the q/k
    head size before SDPA, so the score matmuls count it at that size. Checkpointing (``full``)
    reruns each block's forward up to the op that saves the block's last tensors (torch's early
    stop): all of an MoE block but an ungated shared expert's down_proj, a dense block but its
    down_proj. Equal to FlopCounterMode (``tests/moe/test_flops.py``, ``tests/moe/test_hf.py``).
    """
    seq = tokens_per_sequence(model, training)
    b = training.batch_size
    t = b * seq
    d, hq = model.d_model, model.num_heads
    hqk, hv = _score_dims(model)
    if model.attention_type == "mla" and not model.deepseek_transformers:  # v zero-padded to the q/k head size
        hv = hqk
    att_w = _attention_weights(model)
    scores_f = 2 * b * hq * seq * seq * (hqk + hv)
    # SDPA's backward recomputes QKᵀ (torch's sdpa_backward_flop); transformers' MLA runs the math kernel, whose
    # four backward bmms are twice its two forward ones
    fused = model.attention == "sdpa" and not model.deepseek_transformers
    scores_b = 2 * b * hq * seq * seq * (3 * hqk + 2 * hv) if fused else 2 * scores_f
    routes = iter(expert_tokens(model, training))
    forward = backward = recompute = 0
    for i in range(model.num_layers):
        if model.is_moe_layer(i):
            counts = next(routes)
            lin = t * d * model.num_experts + sum(counts) * 3 * d * model.expert_d_ff
            lin += t * 3 * d * model.shared_expert_d_ff + (t * d if model.shared_expert_gate else 0)
            # what checkpointing's rerun skips: it stops once the block's last saved tensors are packed,
            # before the op that saves them runs -- the shared expert's down_proj (no gate), else an
            # op without matmuls (the last index_add_, or the gate's product)
            ungated = model.shared_expert_d_ff and not model.shared_expert_gate
            last_flops = 2 * t * d * model.shared_expert_d_ff if ungated else 0
        else:
            f = model.d_ff or 0
            lin = t * 3 * d * f
            last_flops = 2 * t * d * f
        block_f = 2 * t * att_w + scores_f + 2 * lin
        forward += block_f
        backward += 4 * t * att_w + scores_b + 4 * lin
        if training.activation_checkpointing == "full":
            recompute += block_f - last_flops
    head = model.vocab_size * d
    return MoEMatmuls(forward + 2 * t * head, backward + 4 * t * head, recompute)


# --------------------------------------------------------------------------------------------
# The family


@register_family("moe")
class MoEFamily:
    """Mixture-of-experts transformers (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3); docs/moe.md."""

    name = "moe"

    def parameters(self, model: MoEConfig) -> list[ParamTensor]:
        """Every parameter tensor (all experts: each has a gradient and optimizer state)."""
        return parameter_tensors(model)

    def activation_elements(self, model: MoEConfig, batch: TrainingConfig) -> int:
        """Elements autograd saves for backward in one fp32 step, from the event simulation."""
        return self.activation_bytes(model, batch, StepShape(4, 4, 4, False)) // 4

    def activation_bytes(self, model: MoEConfig, batch: TrainingConfig, shape: StepShape) -> int:
        """Bytes autograd saves for backward in one step (the router's and experts' tensors included).

        Taken from the event simulation (``moe_events``), each tensor at its real dtype: int64 routing
        indices, fp32 router probabilities, the gathered tokens and hidden states of every expert. A deep
        model whose blocks all route alike is not simulated whole: under the training section's own dtypes
        they are read off the periodic program of the step's forward-backward (``simulate.model_body_program``,
        which the estimate's simulation finds anyway, checked layer count by layer count: docs/peak.md);
        otherwise the saved bytes of ``n``, ``n + p`` and ``n + 2p`` layers (p = ``moe_layer_step``) must grow
        by the same amount, and that amount is repeated for the remaining periods (else the whole model).
        """
        from estimator.periodic import role_bytes
        from estimator.simulate import COMPRESS_ABOVE_LAYERS, _is_saved, model_body_program, precision_shape

        given = model.routing.tokens_per_expert or []
        if shape == precision_shape(batch.precision) and model.num_layers > COMPRESS_ABOVE_LAYERS and len(given) <= 1:
            program = model_body_program(model, batch)
            if program is not None:
                return role_bytes(program, _is_saved)
        period = model.moe_layer_step
        base = max(4, model.first_dense_layers + 2 * period)
        base += (model.num_layers - base) % period
        if model.num_layers > base + 2 * period and len(given) <= 1:
            a, b, c = (_saved_bytes(model.model_copy(update={"num_layers": base + i * period}), batch, shape)
                       for i in range(3))
            if b - a == c - b:
                return a + (model.num_layers - base) // period * (b - a)
        return _saved_bytes(model, batch, shape)

    def batch_in_force(self, model: MoEConfig, batch: TrainingConfig) -> BatchInForce:
        """B sequences of S tokens; S is ``training.seq_len``, else the model's ``max_seq_len``."""
        given = batch.seq_len is not None
        return BatchInForce(batch.batch_size, tokens_per_sequence(model, batch), "training.batch_size",
                            "training.seq_len" if given else "model.max_seq_len")

    def flops(self, model: MoEConfig, batch: TrainingConfig) -> FlopCount:
        """6·N_active·T plus the attention scores, and the exact matmul count under the routing.

        ``forward`` = 2·N_active·T + the score matmuls, ``backward`` twice that (Kaplan et al. 2020's
        6·N·D with N the parameters a token uses; the router and shared experts are in N_active).
        ``attention`` = 6·L·B·H·S²·(h_qk + h_v) (PaLM appendix B's 12·L·H·h·S·T when h_qk = h_v).
        """
        seq = tokens_per_sequence(model, batch)
        t = batch.batch_size * seq
        n = flop_parameters(model)
        hqk, hv = _score_dims(model)
        attn_f = model.num_layers * 2 * batch.batch_size * model.num_heads * seq * seq * (hqk + hv)
        exact = matmul_flops(model, batch)
        return FlopCount(forward=2 * n * t + attn_f, backward=4 * n * t + 2 * attn_f, matmul=exact.total,
                         matmul_forward=exact.forward, attention=3 * attn_f, tokens=t, rule_parameters=n)

    def details(self, model: MoEConfig, batch: TrainingConfig) -> dict[str, Any]:
        """Total and active parameters and the routing assumption (``model_details`` in the JSON)."""
        return details(model, batch)

    def input_events(self, model: MoEConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """Token ids and targets, (B, S) int64 each; the ids alone with ``labels_from_inputs``; the buffers
        (rotary ``inv_freq``; with ``deepseek_transformers`` each router's ``e_score_correction_bias``, E elements
        in the parameters' dtype) as state, like the parameters."""
        from estimator.families.transformer import TransformerFamily

        events = TransformerFamily().input_events(model.dense_view(), batch, shape)  # ids (targets), rotary buffers
        if model.deepseek_transformers:
            events = [alloc(f"blocks.{i}.moe.e_score_correction_bias", "parameter",
                            model.num_experts * shape.parameter_bytes, "setup") for i in model.moe_layers] + events
        return events

    def forward_backward_events(self, model: MoEConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """Every allocation and release of forward, loss and backward (``moe_events``)."""
        from estimator.families.moe_events import step_events

        return step_events(model, batch, shape)

    def end_of_step_events(self, model: MoEConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """The loss, held by the caller until the step is over."""
        loss_bytes = 4 if shape.autocast or model.loss_upcast else shape.activation_bytes
        return [free("loss", "temporary", loss_bytes, "zero_grad")]


def _saved_bytes(model: MoEConfig, batch: TrainingConfig, shape: StepShape) -> int:
    """Bytes of the forward and loss allocations autograd saves, from the event simulation."""
    from estimator.families.moe_events import step_events

    return sum(e.nbytes for e in step_events(model, batch, shape) if e.nbytes > 0 and e.role == "activation"
               and e.phase in ("forward", "loss"))


def details(model: MoEConfig, training: TrainingConfig) -> dict[str, Any]:
    """The ``model_details`` of ``estimate --json``: total and active parameters, the routing assumed."""
    experts = sum(p.numel for p in parameter_tensors(model) if ".experts." in p.name)
    return {"parameters_total": parameter_count(model), "parameters_active": active_parameter_count(model),
            "routed_expert_parameters": experts, "moe_layers": len(model.moe_layers),
            "num_experts": model.num_experts, "experts_per_token": model.experts_per_token,
            "routing": model.routing.mode, "tokens_per_expert": expert_tokens(model, training),
            "routing_assumption": routing_assumption(model, training)}


def rule_note(model: MoEConfig, training: TrainingConfig, tokens: str, n: int, total: int) -> str:
    """The FLOP table's caption for an MoE model: what N_active is, and the routing assumed."""
    active = active_parameter_count(model)
    return (f"6·N·T uses {tokens} and N = {n:,} active parameters: {active:,} of the {total:,} are used per token "
            f"({model.experts_per_token} of {model.num_experts} routed experts), less the token embedding (a lookup, "
            f"no matmul). Routing assumed ({routing_assumption(model, training)}) — docs/moe.md")
