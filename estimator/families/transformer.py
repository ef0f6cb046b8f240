"""The decoder-only transformer family: GPT-2, Llama, Mistral, Qwen2, GPT-NeoX as one config.

Pure Python (no torch). Every number here describes the project's own torch implementation,
``estimator.measure.transformer`` (a nanoGPT-style model), and is tested against it; see
``docs/transformer.md`` for the formulas, their sources and how they compare with the literature.

Notation used throughout: B batch, S sequence length, T = B·S tokens, d = d_model, L layers,
H query heads, K key/value heads, h head size, F d_ff, V vocabulary, r rotary dims per head.
FLOPs count 2 per multiply-add (the convention of Kaplan et al. 2020 and of FlopCounterMode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from estimator.config import StrictModel, TrainingConfig
from estimator.errors import EstimatorError
from estimator.events import Event, alloc, free
from estimator.families.base import BatchInForce, FlopCount, ParamTensor, StepShape, register_family
from estimator.families.memo import per_model


class TransformerConfig(StrictModel):
    """A decoder-only transformer; the defaults are GPT-2 small (124M)."""

    family: Literal["transformer"] = "transformer"
    vocab_size: int = Field(50257, gt=0, description="V, the vocabulary size (rows of the token embedding)")
    d_model: int = Field(768, gt=0, description="d, the width of the residual stream")
    num_layers: int = Field(12, gt=0, description="L, the number of transformer blocks")
    num_heads: int = Field(12, gt=0, description="H, attention (query) heads per block")
    num_kv_heads: int | None = Field(
        None, gt=0, description="K, key/value heads (grouped-query attention); null = num_heads (multi-head)"
    )
    head_dim: int | None = Field(
        None, gt=0, description="h, the size of one head; null = d_model / num_heads"
    )
    d_ff: int | None = Field(
        None, gt=0, description="F, the MLP hidden width; null = 4·d_model (gelu only; swiglu needs it given)"
    )
    mlp: Literal["gelu", "gelu_new", "swiglu"] = Field(
        "gelu", description="gelu: up, GELU, down (GPT-2) | gelu_new: the same with transformers' tanh GELU written "
        "in Python (NewGELUActivation: each elementwise op saves its tensors) | swiglu: down(silu(gate)·up) (Llama)"
    )
    norm: Literal["layernorm", "rmsnorm"] = Field(
        "layernorm", description="layernorm (weight, and bias if `bias`) | rmsnorm (weight only)"
    )
    bias: bool = Field(True, description="biases on every linear layer and layernorm (GPT-2, GPT-NeoX)")
    qkv_bias: bool = Field(
        False, description="biases on the query/key/value projections only (Qwen2); implied by `bias`"
    )
    positions: Literal["learned", "rope"] = Field(
        "learned", description="learned: a max_seq_len x d position embedding (GPT-2) | rope: rotary (Llama)"
    )
    rotary_pct: float = Field(
        1.0, gt=0, le=1, description="fraction of each head rotated by RoPE (GPT-NeoX uses 0.25)"
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency θ")
    parallel_residual: bool = Field(
        False, description="x + attn(norm1(x)) + mlp(norm2(x)) in one step (GPT-NeoX) instead of two"
    )
    max_seq_len: int = Field(
        1024, gt=0, description="the longest sequence (rows of a learned position table)"
    )
    tie_embeddings: bool = Field(True, description="the output head reuses the token embedding matrix")
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="the torch implementation's kernel: sdpa (F.scaled_dot_product_attention, "
        "saves no S x S scores) | eager (softmax(QKᵀ/√h + mask)·V, saves the probabilities)",
    )
    norm_eps: float = Field(1e-5, gt=0, description="ε of the normalisation layers")
    rope_concat: bool = Field(
        False, description="RoPE as transformers writes it for Phi-3 and GPT-NeoX: on the (B, H, S, h) heads, the "
        "rotated part concatenated with the rest (even when empty): q, k and SDPA's output are laid out (B, H, S, h), "
        "so the output projection's input is a copy"
    )
    rope_stream_dtype: bool = Field(
        False, description="cos and sin in the residual stream's dtype, made with autocast off (transformers' "
        "rotary embedding): under autocast RoPE's products are fp32 and SDPA casts q and k back to 16 bits"
    )
    fused_qkv: bool = Field(
        False, description="one q/k/v projection (attn.qkv_proj), q, k and v slices of its output (transformers' "
        "Phi-3 qkv_proj, GPT-NeoX query_key_value)"
    )
    fused_gate_up: bool = Field(
        False, description="swiglu: one gate/up projection (mlp.gate_up_proj), gate and up slices of its output "
        "(transformers' Phi-3 gate_up_proj)"
    )
    rope_buffers: bool = Field(
        False, description="the rotary embedding keeps inv_freq and original_inv_freq as buffers (transformers' "
        "rotary embedding classes): r/2 elements each, in the parameter dtype"
    )
    kv_cache: bool = Field(
        False, description="the training forward fills transformers' DynamicCache (use_cache, on by default): k and v "
        "copied by torch.cat and kept until the forward returns; off under checkpointing, as transformers turns it off"
    )
    embd_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout probability on the embeddings' sum (GPT-2's embd_pdrop, transformers' "
        "GPT2Model.drop); training mode: a noise tensor of the stream's size kept for backward"
    )
    resid_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout probability after the attention's and the MLP's output projections "
        "(GPT-2's resid_pdrop: GPT2Attention.resid_dropout, GPT2MLP.dropout)"
    )
    attn_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout probability on the attention probabilities (GPT-2's attn_pdrop): "
        "sdpa gets it as dropout_p, which on the CPU runs torch's math attention (the B·H·S·S probabilities kept); "
        "eager drops the softmax output"
    )
    loss_upcast: bool = Field(
        False, description="the loss takes logits.float() first (transformers' ForCausalLMLoss): fp32 "
        "log-probabilities and loss in 16-bit precisions"
    )
    labels_from_inputs: bool = Field(
        False, description="the labels are the input ids, shifted inside the loss (transformers' ForCausalLMLoss): "
        "one [B, S] int64 input, the shifted copy saved by the loss"
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> TransformerConfig:
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}), "
                "or give head_dim"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.mlp == "swiglu" and self.d_ff is None:
            raise ValueError("d_ff must be given for mlp: swiglu (there is no standard default)")
        if self.positions == "rope":
            rot = int(self.head_size * self.rotary_pct)
            if rot < 2 or rot % 2:
                raise ValueError(
                    f"rotary dims per head (head size {self.head_size} x rotary_pct {self.rotary_pct}"
                    f" = {rot}) "
                    "must be even and at least 2"
                )
        elif self.rotary_pct != 1.0:
            raise ValueError("rotary_pct applies to positions: rope only")
        elif self.rope_concat or self.rope_stream_dtype or self.rope_buffers:
            raise ValueError("rope_concat, rope_stream_dtype and rope_buffers apply to positions: rope only")
        if self.attention == "eager" and (self.rope_stream_dtype or self.kv_cache or self.fused_qkv):
            raise ValueError("rope_stream_dtype, kv_cache and fused_qkv are modelled with attention: sdpa only")
        if self.fused_gate_up and self.mlp != "swiglu":
            raise ValueError("fused_gate_up applies to mlp: swiglu only")
        gpt2_heads = self.positions == "learned" and self.kv_heads == self.num_heads
        if self.attn_dropout and self.attention == "sdpa" and not gpt2_heads:
            raise ValueError("attn_dropout with attention: sdpa (torch's math attention) is modelled for learned "
                             "positions and multi-head attention (GPT-2) only")
        return self

    # Derived sizes (properties, so they never disagree with the fields).
    @property
    def kv_heads(self) -> int:
        """K: key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        """h: the size of one head."""
        return self.head_dim or self.d_model // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """F: the MLP hidden width."""
        return self.d_ff or 4 * self.d_model

    @property
    def rotary_dim(self) -> int:
        """r: the rotated dims per head (0 without RoPE); HF's ``int(head_size * rotary_pct)``."""
        return int(self.head_size * self.rotary_pct) if self.positions == "rope" else 0

    @property
    def linear_bias(self) -> bool:
        return self.bias

    @property
    def qkv_has_bias(self) -> bool:
        return self.bias or self.qkv_bias

    @property
    def norm_has_bias(self) -> bool:
        """LayerNorm carries a bias iff ``bias`` (nanoGPT's convention); RMSNorm never does."""
        return self.norm == "layernorm" and self.bias


def tokens_per_sequence(model: TransformerConfig, training: TrainingConfig) -> int:
    """S: ``training.seq_len``, or ``model.max_seq_len`` when it is not given (documented default)."""
    seq = training.seq_len if training.seq_len is not None else model.max_seq_len
    if seq > model.max_seq_len:
        raise EstimatorError(
            f"training.seq_len: {seq} exceeds the model's max_seq_len {model.max_seq_len}"
        )
    return seq


# --------------------------------------------------------------------------------------------
# Parameters


@per_model
def parameter_tensors(model: TransformerConfig) -> list[ParamTensor]:
    """Every parameter by name and shape, in ``named_parameters()`` order of the torch model.

    Linear weights are (out, in) like ``nn.Linear``. Exact for the published architectures: GPT-2
    (learned positions, biased layernorms and linears, tied head), Llama/Mistral (RMSNorm weight,
    no biases, SwiGLU, untied head), Qwen2 (plus q/k/v biases), GPT-NeoX (biased, untied).
    """
    d, h, hq, hk, f, v = (model.d_model, model.head_size, model.num_heads, model.kv_heads,
                          model.ffn_dim, model.vocab_size)
    out: list[ParamTensor] = [ParamTensor("tok_emb.weight", (v, d))]
    if model.positions == "learned":
        out.append(ParamTensor("pos_emb.weight", (model.max_seq_len, d)))

    def norm(prefix: str) -> list[ParamTensor]:
        tensors = [ParamTensor(f"{prefix}.weight", (d,))]
        if model.norm_has_bias:
            tensors.append(ParamTensor(f"{prefix}.bias", (d,)))
        return tensors

    def linear(prefix: str, n_in: int, n_out: int, bias: bool) -> list[ParamTensor]:
        tensors = [ParamTensor(f"{prefix}.weight", (n_out, n_in))]
        if bias:
            tensors.append(ParamTensor(f"{prefix}.bias", (n_out,)))
        return tensors

    for i in range(model.num_layers):
        p = f"blocks.{i}"
        out += norm(f"{p}.norm1")
        if model.fused_qkv:
            out += linear(f"{p}.attn.qkv_proj", d, (hq + 2 * hk) * h, model.qkv_has_bias)
        else:
            out += linear(f"{p}.attn.q_proj", d, hq * h, model.qkv_has_bias)
            out += linear(f"{p}.attn.k_proj", d, hk * h, model.qkv_has_bias)
            out += linear(f"{p}.attn.v_proj", d, hk * h, model.qkv_has_bias)
        out += linear(f"{p}.attn.o_proj", hq * h, d, model.linear_bias)
        out += norm(f"{p}.norm2")
        if model.mlp == "swiglu" and model.fused_gate_up:
            out += linear(f"{p}.mlp.gate_up_proj", d, 2 * f, model.linear_bias)
        else:
            if model.mlp == "swiglu":
                out += linear(f"{p}.mlp.gate_proj", d, f, model.linear_bias)
            out += linear(f"{p}.mlp.up_proj", d, f, model.linear_bias)
        out += linear(f"{p}.mlp.down_proj", f, d, model.linear_bias)
    out += norm("norm_f")
    if not model.tie_embeddings:
        out.append(ParamTensor("lm_head.weight", (v, d)))
    return out


#: Megatron-LM's split (Shoeybi et al. 2019, section 3): column-parallel layers shard their output rows,
#: row-parallel layers their input columns; the embedding and the head shard the vocabulary rows
COLUMN_PARALLEL = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("attn.o_proj", "mlp.down_proj")
VOCAB_PARALLEL = ("tok_emb.weight", "lm_head.weight")


@per_model
def sharded_parameter_tensors(model: TransformerConfig, tp: int) -> list[ParamTensor]:
    """The parameters one tensor-parallel rank holds (docs/tp.md), in ``named_parameters()`` order.

    torch's plan (``ColwiseParallel``, ``RowwiseParallel``, ``Shard(0)`` embedding and head): a
    column-parallel weight (out, in) keeps out/t rows and its bias out/t; a row-parallel weight keeps
    in/t columns and its bias whole (replicated); the token embedding and an untied head keep V/t rows;
    norms and learned positions are replicated. Every sharded size must divide by t (checked by
    :func:`check_tensor_parallel`).
    """
    if tp == 1:
        return parameter_tensors(model)
    out = []
    for p in parameter_tensors(model):
        module = p.name.rsplit(".", 1)[0].split(".", 2)[-1] if p.name.startswith("blocks.") else ""
        shape = p.shape
        if module in COLUMN_PARALLEL:
            shape = (shape[0] // tp, *shape[1:])
        elif module in ROW_PARALLEL and p.name.endswith(".weight"):
            shape = (shape[0], shape[1] // tp)
        elif p.name in VOCAB_PARALLEL:
            shape = (shape[0] // tp, shape[1])
        out.append(ParamTensor(p.name, shape, p.trainable))
    return out


#: the boolean options that make the step transformers' (docs/transformer.md), in the order they are listed
HF_STYLE_OPTIONS = ("loss_upcast", "labels_from_inputs", "fused_qkv", "fused_gate_up", "rope_concat",
                    "rope_stream_dtype", "rope_buffers", "kv_cache")
#: the dropout probabilities (an hf_config sets them from config.json; docs/transformer.md)
DROPOUT_OPTIONS = ("embd_dropout", "resid_dropout", "attn_dropout")


def check_tensor_parallel(model: TransformerConfig, tp: int) -> None:
    """Every sharded dimension divides by the TP degree, else one line naming the field.

    The transformers-style options (docs/transformer.md; an ``hf_config`` sets them) are not modelled with
    tensor parallelism: one line naming every one that is set.
    """
    if tp > 1:
        hf_style = [f for f in HF_STYLE_OPTIONS + DROPOUT_OPTIONS if getattr(model, f, False)]
        if getattr(model, "mlp", "") == "gelu_new":
            hf_style.append("mlp: gelu_new")
        if hf_style:
            raise EstimatorError(f"model.{hf_style[0].split(':')[0]}: the transformers-style options "
                                 f"{', '.join(hf_style)} (set by hf_config) are not modelled with tensor parallelism "
                                 "(docs/tp.md); set them to false (gelu for gelu_new, 0 for a dropout), or drop "
                                 "parallel.tp_size")
    for field, value in (("model.num_heads", model.num_heads), ("model.num_kv_heads", model.kv_heads),
                         ("model.d_ff", model.ffn_dim), ("model.vocab_size", model.vocab_size)):
        if value % tp:
            raise EstimatorError(f"{field}: {value} is not divisible by the tensor-parallel degree {tp} "
                                 f"(each rank needs whole heads and equal shards)")


def parameter_count(model: TransformerConfig) -> int:
    """Total parameters (a tied head counted once, as ``sum(p.numel() for p in model.parameters())``)."""
    return sum(p.numel for p in parameter_tensors(model))


def embedding_parameters(model: TransformerConfig) -> int:
    """Token (and learned position) embedding parameters; the untied head is not an embedding here."""
    n = model.vocab_size * model.d_model
    return n + (model.max_seq_len * model.d_model if model.positions == "learned" else 0)


def flop_parameters(model: TransformerConfig) -> int:
    """N of the 6·N·D rule: every parameter except the embedding lookups, plus the head matrix.

    Kaplan et al. 2020 (Table 1) use non-embedding N and leave out the de-embedding matmul; we
    keep it (2·d·V FLOPs per token forward, a third of GPT-2 small's compute), counting the tied
    matrix once as the head. Norm weights and biases are in N though they do no matmul.
    """
    tied_head = model.vocab_size * model.d_model if model.tie_embeddings else 0
    return parameter_count(model) - embedding_parameters(model) + tied_head


# --------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class MatmulFlops:
    """The exact matmul FLOPs FlopCounterMode reports for one step of the torch implementation.

    ``recompute`` is the forward rerun by activation checkpointing during backward (0 without);
    ``total`` = forward + backward + recompute, which is what one FlopCounterMode around the
    whole step reports.
    """

    forward: int
    backward: int
    recompute: int

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute


def _block_linear_weights(model: TransformerConfig) -> int:
    """Multiply-adds per token of one block's linear layers (weights only, no biases)."""
    d, h, hq, hk, f = model.d_model, model.head_size, model.num_heads, model.kv_heads, model.ffn_dim
    mlp_mats = 3 if model.mlp == "swiglu" else 2
    return d * (hq + 2 * hk) * h + hq * h * d + mlp_mats * d * f


def matmul_flops(model: TransformerConfig, training: TrainingConfig) -> MatmulFlops:
    """Every mm/addmm/bmm/SDPA FLOP of one training step, as FlopCounterMode counts them.

    Per block and step (T tokens): linears 2·T·W forward, 4·T·W backward (input and weight
    gradients; every block input requires grad). Attention forward 4·B·H·S²·h for both kernels
    (QKᵀ and P·V, causal mask not discounted: torch's ``sdpa_flop`` and a dense bmm both count the
    full S x S). Attention backward: eager 8·B·H·S²·h (two bmms per forward bmm); sdpa 10·B·H·S²·h,
    torch's ``sdpa_backward_flop`` formula (it includes recomputing QKᵀ), which
    ``estimator.measure.flop_formulas`` registers for the CPU kernel; with ``attn_dropout`` the CPU runs torch's
    math attention, two bmms forward and four backward, 8·B·H·S²·h as eager. Head: 2·T·d·V forward,
    4·T·d·V backward. The embedding, norms, softmax, RoPE and the loss do no matmul.

    Checkpointing (``full``) reruns each block's forward in backward, except the block's last
    linear (``down_proj``): torch's non-reentrant checkpoint stops the rerun as soon as the last
    saved tensor is repacked, which happens when ``down_proj``'s inputs are saved, before its
    matmul runs (``torch.utils.checkpoint`` early stop, on by default). With ``resid_dropout`` the last saved tensor
    is the MLP dropout's noise, so ``down_proj`` is rerun too.
    """
    seq = tokens_per_sequence(model, training)
    t = training.batch_size * seq
    w = _block_linear_weights(model)
    attn_fwd = 4 * model.num_heads * model.head_size * seq * t
    attn_bwd = (10 if model.attention == "sdpa" and not model.attn_dropout else 8) * model.num_heads * \
        model.head_size * seq * t
    head = model.vocab_size * model.d_model
    layers = model.num_layers
    forward = layers * (2 * t * w + attn_fwd) + 2 * t * head
    backward = layers * (4 * t * w + attn_bwd) + 4 * t * head
    recompute = 0
    if training.activation_checkpointing == "full":  # with resid_dropout the rerun stops after down_proj's dropout
        down = 0 if model.resid_dropout else 2 * t * model.ffn_dim * model.d_model
        recompute = layers * (2 * t * w + attn_fwd - down)
    return MatmulFlops(forward, backward, recompute)


# --------------------------------------------------------------------------------------------
# Activations

#: Dtype classes of saved tensors. "act": the activation dtype (16-bit matmul inputs/outputs
#: under autocast); "stream": the residual stream's dtype (the parameter dtype: fp32 under
#: autocast); "fp32": always float32 (SDPA's logsumexp, RMSNorm's upcast statistics).
Kind = Literal["act", "stream", "fp32", "int64"]


@dataclass(frozen=True)
class SavedTensor:
    """One tensor that autograd keeps from forward to backward (one storage, counted once)."""

    name: str
    numel: int
    kind: Kind
    layer: int  # block index; -1 before the blocks (embedding, RoPE tables), L after (head, loss)

    def nbytes(self, shape: StepShape) -> int:
        return self.numel * kind_bytes(self.kind, shape)


def kind_bytes(kind: str, shape: StepShape) -> int:
    """Bytes per element of a dtype class under a precision plan."""
    if kind == "int64":
        return 8
    if kind == "fp32":
        return 4
    if kind == "stream":
        return shape.parameter_bytes
    return shape.activation_bytes


def _norm_saved(model: TransformerConfig, prefix: str, x_name: str, t: int, layer: int,
                shares_input: bool, fp32_step: bool) -> list[SavedTensor]:
    """What one norm saves, beyond its weight/bias (parameters).

    LayerNorm (``native_layer_norm``): its input, mean and rstd (T each). Our RMSNorm (HF Llama's:
    upcast to fp32, ``x·rsqrt(mean(x²)+ε)``, cast back, times weight): the fp32 input (``pow`` and
    ``mul`` save it; the input itself when the stream already is fp32), rstd (fp32, T) and the
    normalised tensor before the weight (``mul`` by the weight saves it).
    ``shares_input``: the input was already saved by another norm (parallel residual).
    """
    d = model.d_model
    out: list[SavedTensor] = []
    if model.norm == "layernorm":
        if not shares_input:
            out.append(SavedTensor(x_name, d * t, "stream", layer))
        out += [SavedTensor(f"{prefix}.mean", t, "stream", layer),
                SavedTensor(f"{prefix}.rstd", t, "stream", layer)]
        return out
    if fp32_step:  # x.float() is x itself: the saved input is the stream tensor
        if not shares_input:
            out.append(SavedTensor(x_name, d * t, "stream", layer))
    else:
        out.append(SavedTensor(f"{prefix}.x_fp32", d * t, "fp32", layer))
    out += [SavedTensor(f"{prefix}.rstd", t, "fp32", layer),
            SavedTensor(f"{prefix}.normed", d * t, "stream", layer)]
    return out


def saved_tensors(model: TransformerConfig, training: TrainingConfig) -> list[SavedTensor]:
    """Every tensor the torch implementation saves for backward in one step, in forward order.

    Parameters (and their views), the token ids and the targets are excluded; each storage is
    listed once (views such as q/k/v heads count as the projection output they view).
    """
    head, block, tail = _saved_parts(model, training)
    return [*head, *(s for i in range(model.num_layers) for s in block(i)), *tail]


def _saved_total(model: TransformerConfig, training: TrainingConfig, size: Callable[[SavedTensor], int]) -> int:
    """``sum(size(s) for s in saved_tensors(model, training))`` with one block's tensors summed once and times the
    layer count: blocks save the same tensors, named by their index (``_block_saved``), so a 100,000-layer model
    costs one block, not 100,000 (``tests/transformer/test_activations.py`` checks it equals the sum over the list)."""
    head, block, tail = _saved_parts(model, training)
    return sum(map(size, head)) + model.num_layers * sum(map(size, block(0))) + sum(map(size, tail))


def _saved_parts(model: TransformerConfig, training: TrainingConfig
                 ) -> tuple[list[SavedTensor], Callable[[int], list[SavedTensor]], list[SavedTensor]]:
    """:func:`saved_tensors` as what comes before the blocks, what block ``i`` saves, and what comes after."""
    seq = tokens_per_sequence(model, training)
    b = training.batch_size
    t = b * seq
    d, v = model.d_model, model.vocab_size
    autocast = training.precision.startswith("amp")
    fp32_step = training.precision == "fp32" or autocast  # the residual stream is fp32
    layers = model.num_layers
    head: list[SavedTensor] = []
    if model.positions == "rope":
        # cos and sin (S x r), built once per forward and saved by the RoPE multiplications.
        rope_kind: Kind = "stream" if model.rope_stream_dtype else "act"
        head += [SavedTensor("rope.cos", seq * model.rotary_dim, rope_kind, -1),
                 SavedTensor("rope.sin", seq * model.rotary_dim, rope_kind, -1)]
    if model.embd_dropout:  # the dropout's noise, in the embeddings' dtype (the stream's)
        head.append(SavedTensor("emb.noise", d * t, "stream", -1))

    def block(i: int) -> list[SavedTensor]:
        if training.activation_checkpointing == "full":
            # Only each block's input, saved by the checkpoint (its _NoopSaveInputs node).
            return [SavedTensor(f"blocks.{i}.x_in", d * t, "stream", i)]
        return _block_saved(model, i, b, seq, fp32_step, autocast)

    x_last = f"blocks.{layers - 1}.x_out"
    tail = _norm_saved(model, "norm_f", x_last, t, layers, False, fp32_step)
    tail.append(SavedTensor("lm_head.x_in", d * t, "act", layers))
    # cross_entropy = log_softmax (saves its output) + nll_loss (saves that and the total weight,
    # a 0-dim tensor). Under autocast cross_entropy runs in fp32.
    loss_kind: Kind = "fp32" if autocast or model.loss_upcast else "act"
    tail += [SavedTensor("loss.log_probs", v * t, loss_kind, layers)]
    if model.labels_from_inputs:  # nll_loss saves its target: the contiguous shifted copy of the ids
        tail.append(SavedTensor("loss.shifted_labels", t, "int64", layers))
    tail.append(SavedTensor("loss.total_weight", 1, loss_kind, layers))
    return head, block, tail


def _block_saved(model: TransformerConfig, i: int, b: int, seq: int, fp32_step: bool,
                 autocast: bool) -> list[SavedTensor]:
    """What block ``i`` saves (no checkpointing); see docs/transformer.md for the table.

    Under autocast every linear casts its fp32 input to 16 bits itself (autocast caches only the
    weight casts), so q/k/v projections save three copies of their input, SwiGLU's gate/up two.
    """
    t = b * seq
    d, h, hq, hk, f = model.d_model, model.head_size, model.num_heads, model.kv_heads, model.ffn_dim
    p = f"blocks.{i}"
    out = _norm_saved(model, f"{p}.norm1", f"{p}.x_in", t, i, False, fp32_step)
    out.append(SavedTensor(f"{p}.attn.x_in", d * t, "act", i))  # q/k/v projections' input
    if autocast and not model.fused_qkv:  # each projection casts its input itself; a fused one once
        out += [SavedTensor(f"{p}.attn.x_in.k", d * t, "act", i),
                SavedTensor(f"{p}.attn.x_in.v", d * t, "act", i)]
    if model.attention == "sdpa" and model.attn_dropout:
        # torch's math attention (CPU, dropout_p > 0), in fp32 whatever the dtype: the batched q·√s and kᵀ·√s
        # (the scaled k itself when it is the cache's contiguous copy), v (a batched copy, or the cache's copy in
        # fp32 in 16-bit), the softmax output, the dropout's noise and the dropped probabilities; the (B, H, S, h)
        # output is copied for o_proj (its input, saved)
        out += [SavedTensor(f"{p}.attn.q_batched", hq * h * t, "fp32", i),
                SavedTensor(f"{p}.attn.k_batched", hq * h * t, "fp32", i),
                SavedTensor(f"{p}.attn.v_batched", hq * h * t, "fp32", i),
                SavedTensor(f"{p}.attn.probs", hq * seq * t, "fp32", i),
                SavedTensor(f"{p}.attn.probs.noise", hq * seq * t, "fp32", i),
                SavedTensor(f"{p}.attn.probs.dropped", hq * seq * t, "fp32", i),
                SavedTensor(f"{p}.attn.y", hq * h * t, "act", i)]
    elif model.attention == "sdpa":
        # SDPA (flash kernel, GQA native): q, k, v, output and logsumexp. The output is laid out
        # (B, S, H, h), so o_proj's input is a view of it: no separate copy.
        # fused_qkv: a saved slice keeps the whole projection output (v when RoPE made q and k anew and no
        # cache copied v; without RoPE q, k and v are the three slices of one storage, the same total)
        q_n, k_n, v_n = hq * h * t, hk * h * t, hk * h * t
        if model.fused_qkv:  # kv_cache: k and v are copies; RoPE: q and k are new tensors
            whole, copied = (hq + 2 * hk) * h * t, model.kv_cache
            if model.positions == "rope":
                v_n = v_n if copied else whole
            else:
                q_n, k_n, v_n = whole, k_n if copied else 0, v_n if copied else 0
        out += [SavedTensor(f"{p}.attn.q", q_n, "act", i),
                SavedTensor(f"{p}.attn.k", k_n, "act", i),
                SavedTensor(f"{p}.attn.v", v_n, "act", i),
                SavedTensor(f"{p}.attn.out", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.lse", hq * t, "fp32", i)]
        if model.rope_concat:  # the output is laid out (B, H, S, h): o_proj's input is a (B, S, H·h) copy
            out.append(SavedTensor(f"{p}.attn.y", hq * h * t, "act", i))
    else:
        # Eager: the two bmms save their inputs (q, k and v broadcast to H heads) and the softmax
        # its output P (B·H·S²), which the P·V bmm saves too (same storage); o_proj saves the
        # (B, S, H·h) copy of the attention output.
        out += [SavedTensor(f"{p}.attn.q", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.k", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.probs", hq * seq * t, "act", i),
                SavedTensor(f"{p}.attn.v", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.y", hq * h * t, "act", i)]
        if model.attn_dropout:  # the dropout's noise, and the dropped probabilities P·V saves instead of P
            out += [SavedTensor(f"{p}.attn.probs.noise", hq * seq * t, "act", i),
                    SavedTensor(f"{p}.attn.probs.dropped", hq * seq * t, "act", i)]
    if model.resid_dropout:  # the noise of the dropout after o_proj
        out.append(SavedTensor(f"{p}.attn.o_proj.noise", d * t, "act", i))
    x2 = f"{p}.x_in" if model.parallel_residual else f"{p}.x_mid"
    out += _norm_saved(model, f"{p}.norm2", x2, t, i, model.parallel_residual, fp32_step)
    out.append(SavedTensor(f"{p}.mlp.x_in", d * t, "act", i))
    if autocast and model.mlp == "swiglu" and not model.fused_gate_up:
        out.append(SavedTensor(f"{p}.mlp.x_in.up", d * t, "act", i))
    if model.mlp == "swiglu":
        out += [SavedTensor(f"{p}.mlp.gate", f * t, "act", i),
                SavedTensor(f"{p}.mlp.silu", f * t, "act", i),
                SavedTensor(f"{p}.mlp.up", f * t, "act", i),
                SavedTensor(f"{p}.mlp.hidden", f * t, "act", i)]
    elif model.mlp == "gelu_new":  # pow and the final mul save x; tanh its output; the mul 0.5·x and 1 + tanh
        out += [SavedTensor(f"{p}.mlp.up", f * t, "act", i),
                SavedTensor(f"{p}.mlp.half_x", f * t, "act", i),
                SavedTensor(f"{p}.mlp.tanh", f * t, "act", i),
                SavedTensor(f"{p}.mlp.one_plus_tanh", f * t, "act", i),
                SavedTensor(f"{p}.mlp.hidden", f * t, "act", i)]
    else:
        out += [SavedTensor(f"{p}.mlp.up", f * t, "act", i),
                SavedTensor(f"{p}.mlp.hidden", f * t, "act", i)]
    if model.resid_dropout:  # the noise of the dropout after down_proj
        out.append(SavedTensor(f"{p}.mlp.down_proj.noise", d * t, "act", i))
    return out


def activation_elements_of(model: TransformerConfig, training: TrainingConfig) -> int:
    """Elements saved for backward in one step (all dtype classes together)."""
    return _saved_total(model, training, lambda s: s.numel)


def activation_bytes(model: TransformerConfig, training: TrainingConfig, shape: StepShape) -> int:
    """Bytes saved for backward in one step, each tensor at its dtype class's size."""
    return _saved_total(model, training, lambda s: s.nbytes(shape))


# --------------------------------------------------------------------------------------------
# The family


@register_family("transformer")
class TransformerFamily:
    """Decoder-only transformers (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX); docs/transformer.md."""

    name = "transformer"
    #: what ``memory.activations`` counts, in the words of the explanations
    activation_description = ("what autograd saves for backward: the norms' inputs and statistics, q/k/v, the "
                              "attention outputs, the MLP's hidden tensors and the log-probabilities")

    def parameters(self, model: TransformerConfig) -> list[ParamTensor]:
        """Every parameter tensor by name, matching the torch model's ``named_parameters()``."""
        return parameter_tensors(model)

    def activation_elements(self, model: TransformerConfig, batch: TrainingConfig) -> int:
        """Elements autograd saves for backward in one step of our torch model (``saved_tensors``).

        Without checkpointing, per block and token: the norms' inputs and statistics, the q/k/v
        projections' input, q, k, v, the attention output (plus SDPA's logsumexp, or eager's
        B·H·S² probabilities), the MLP's input and hidden tensors; then the final norm, the head's
        input and the log-probabilities (V per token). With ``full`` checkpointing, each block's
        input only. Dtype classes differ under 16-bit precision: see :func:`activation_bytes`.
        """
        return activation_elements_of(model, batch)

    def activation_bytes(self, model: TransformerConfig, batch: TrainingConfig, shape: StepShape) -> int:
        """Bytes autograd saves for backward, each tensor at its real dtype (:func:`activation_bytes`).

        Under 16-bit precisions the fp32 tensors are weighed at 4 bytes: the residual stream under
        autocast, RMSNorm's upcast input and statistics, SDPA's logsumexp, the fp32 log-probabilities.
        This is the ``memory.activations`` figure and equals ``saved_activations`` (the events).
        """
        return activation_bytes(model, batch, shape)

    def batch_in_force(self, model: TransformerConfig, batch: TrainingConfig) -> BatchInForce:
        """B sequences of S tokens; S is ``training.seq_len``, else the model's ``max_seq_len``."""
        given = batch.seq_len is not None
        return BatchInForce(batch.batch_size, tokens_per_sequence(model, batch), "training.batch_size",
                            "training.seq_len" if given else "model.max_seq_len")

    def flops(self, model: TransformerConfig, batch: TrainingConfig) -> FlopCount:
        """The 6·N·D rule plus PaLM's attention term, and the exact matmul count of our model.

        ``forward`` = 2·N·T + 4·L·H·h·S·T and ``backward`` = 4·N·T + 8·L·H·h·S·T, with N from
        :func:`flop_parameters` (non-embedding parameters plus the head matrix) and T = B·S tokens;
        the attention part (``attention`` = 12·L·H·h·S·T, PaLM appendix B, causal mask not
        discounted) is included in forward/backward, not added to them. Checkpointing's
        recomputation is not model FLOPs, so it is only in ``matmul`` (see :func:`matmul_flops`).
        """
        seq = tokens_per_sequence(model, batch)
        t = batch.batch_size * seq
        n = flop_parameters(model)
        attn = model.num_layers * model.num_heads * model.head_size * seq * t
        exact = matmul_flops(model, batch)
        return FlopCount(
            forward=2 * n * t + 4 * attn,
            backward=4 * n * t + 8 * attn,
            matmul=exact.total,
            matmul_forward=exact.forward,
            attention=12 * attn,
            tokens=t,
            rule_parameters=n,
        )

    def input_events(self, model: TransformerConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """Token ids and targets, (B, S) int64 each; the ids alone with ``labels_from_inputs``."""
        tokens = batch.batch_size * tokens_per_sequence(model, batch)
        ids = [alloc("idx", "input", tokens * 8, "setup")]
        if model.rope_buffers:  # the model's buffers are state, like its parameters (the module family's role)
            nbytes = model.rotary_dim // 2 * shape.parameter_bytes
            ids = [alloc("rope.inv_freq", "parameter", nbytes, "setup"),
                   alloc("rope.original_inv_freq", "parameter", nbytes, "setup"), *ids]
        return ids if model.labels_from_inputs else [*ids, alloc("targets", "input", tokens * 8, "setup")]

    def forward_backward_events(self, model: TransformerConfig, batch: TrainingConfig,
                                shape: StepShape) -> list[Event]:
        """Every allocation and release of forward, loss and backward, in torch's order."""
        from estimator.families.transformer_events import step_events

        return step_events(model, batch, shape)

    def end_of_step_events(self, model: TransformerConfig, batch: TrainingConfig,
                           shape: StepShape) -> list[Event]:
        """The loss, held by the caller until the step is over."""
        loss_bytes = 4 if shape.autocast or model.loss_upcast else shape.activation_bytes
        return [free("loss", "temporary", loss_bytes, "zero_grad")]
