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
from estimator.families.base import FlopCount, ParamTensor, StepShape, register_family


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
    mlp: Literal["gelu", "swiglu"] = Field(
        "gelu", description="gelu: up, GELU, down (GPT-2) | swiglu: down(silu(gate)·up) (Llama)"
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
        out += linear(f"{p}.attn.q_proj", d, hq * h, model.qkv_has_bias)
        out += linear(f"{p}.attn.k_proj", d, hk * h, model.qkv_has_bias)
        out += linear(f"{p}.attn.v_proj", d, hk * h, model.qkv_has_bias)
        out += linear(f"{p}.attn.o_proj", hq * h, d, model.linear_bias)
        out += norm(f"{p}.norm2")
        if model.mlp == "swiglu":
            out += linear(f"{p}.mlp.gate_proj", d, f, model.linear_bias)
        out += linear(f"{p}.mlp.up_proj", d, f, model.linear_bias)
        out += linear(f"{p}.mlp.down_proj", f, d, model.linear_bias)
    out += norm("norm_f")
    if not model.tie_embeddings:
        out.append(ParamTensor("lm_head.weight", (v, d)))
    return out


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
    ``estimator.measure.flop_formulas`` registers for the CPU kernel. Head: 2·T·d·V forward,
    4·T·d·V backward. The embedding, norms, softmax, RoPE and the loss do no matmul.

    Checkpointing (``full``) reruns each block's forward in backward, except the block's last
    linear (``down_proj``): torch's non-reentrant checkpoint stops the rerun as soon as the last
    saved tensor is repacked, which happens when ``down_proj``'s inputs are saved, before its
    matmul runs (``torch.utils.checkpoint`` early stop, on by default).
    """
    seq = tokens_per_sequence(model, training)
    t = training.batch_size * seq
    w = _block_linear_weights(model)
    attn_fwd = 4 * model.num_heads * model.head_size * seq * t
    attn_bwd = (10 if model.attention == "sdpa" else 8) * model.num_heads * model.head_size * seq * t
    head = model.vocab_size * model.d_model
    layers = model.num_layers
    forward = layers * (2 * t * w + attn_fwd) + 2 * t * head
    backward = layers * (4 * t * w + attn_bwd) + 4 * t * head
    recompute = 0
    if training.activation_checkpointing == "full":
        recompute = layers * (2 * t * w + attn_fwd - 2 * t * model.ffn_dim * model.d_model)
    return MatmulFlops(forward, backward, recompute)


# --------------------------------------------------------------------------------------------
# Activations

#: Dtype classes of saved tensors. "act": the activation dtype (16-bit matmul inputs/outputs
#: under autocast); "stream": the residual stream's dtype (the parameter dtype: fp32 under
#: autocast); "fp32": always float32 (SDPA's logsumexp, RMSNorm's upcast statistics).
Kind = Literal["act", "stream", "fp32"]


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
    seq = tokens_per_sequence(model, training)
    b = training.batch_size
    t = b * seq
    d, v = model.d_model, model.vocab_size
    autocast = training.precision.startswith("amp")
    fp32_step = training.precision == "fp32" or autocast  # the residual stream is fp32
    layers = model.num_layers
    out: list[SavedTensor] = []
    if model.positions == "rope":
        # cos and sin (S x r), built once per forward and saved by the RoPE multiplications.
        out += [SavedTensor("rope.cos", seq * model.rotary_dim, "act", -1),
                SavedTensor("rope.sin", seq * model.rotary_dim, "act", -1)]
    if training.activation_checkpointing == "full":
        # Only each block's input, saved by the checkpoint (its _NoopSaveInputs node).
        out += [SavedTensor(f"blocks.{i}.x_in", d * t, "stream", i) for i in range(layers)]
    else:
        for i in range(layers):
            out += _block_saved(model, i, b, seq, fp32_step, autocast)
    x_last = f"blocks.{layers - 1}.x_out"
    out += _norm_saved(model, "norm_f", x_last, t, layers, False, fp32_step)
    out.append(SavedTensor("lm_head.x_in", d * t, "act", layers))
    # cross_entropy = log_softmax (saves its output) + nll_loss (saves that and the total weight,
    # a 0-dim tensor). Under autocast cross_entropy runs in fp32.
    loss_kind: Kind = "fp32" if autocast else "act"
    out += [SavedTensor("loss.log_probs", v * t, loss_kind, layers),
            SavedTensor("loss.total_weight", 1, loss_kind, layers)]
    return out


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
    if autocast:
        out += [SavedTensor(f"{p}.attn.x_in.k", d * t, "act", i),
                SavedTensor(f"{p}.attn.x_in.v", d * t, "act", i)]
    if model.attention == "sdpa":
        # SDPA (flash kernel, GQA native): q, k, v, output and logsumexp. The output is laid out
        # (B, S, H, h), so o_proj's input is a view of it: no separate copy.
        out += [SavedTensor(f"{p}.attn.q", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.k", hk * h * t, "act", i),
                SavedTensor(f"{p}.attn.v", hk * h * t, "act", i),
                SavedTensor(f"{p}.attn.out", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.lse", hq * t, "fp32", i)]
    else:
        # Eager: the two bmms save their inputs (q, k and v broadcast to H heads) and the softmax
        # its output P (B·H·S²), which the P·V bmm saves too (same storage); o_proj saves the
        # (B, S, H·h) copy of the attention output.
        out += [SavedTensor(f"{p}.attn.q", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.k", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.probs", hq * seq * t, "act", i),
                SavedTensor(f"{p}.attn.v", hq * h * t, "act", i),
                SavedTensor(f"{p}.attn.y", hq * h * t, "act", i)]
    x2 = f"{p}.x_in" if model.parallel_residual else f"{p}.x_mid"
    out += _norm_saved(model, f"{p}.norm2", x2, t, i, model.parallel_residual, fp32_step)
    out.append(SavedTensor(f"{p}.mlp.x_in", d * t, "act", i))
    if autocast and model.mlp == "swiglu":
        out.append(SavedTensor(f"{p}.mlp.x_in.up", d * t, "act", i))
    if model.mlp == "swiglu":
        out += [SavedTensor(f"{p}.mlp.gate", f * t, "act", i),
                SavedTensor(f"{p}.mlp.silu", f * t, "act", i),
                SavedTensor(f"{p}.mlp.up", f * t, "act", i),
                SavedTensor(f"{p}.mlp.hidden", f * t, "act", i)]
    else:
        out += [SavedTensor(f"{p}.mlp.up", f * t, "act", i),
                SavedTensor(f"{p}.mlp.hidden", f * t, "act", i)]
    return out


def activation_elements_of(model: TransformerConfig, training: TrainingConfig) -> int:
    """Elements saved for backward in one step (all dtype classes together)."""
    return sum(s.numel for s in saved_tensors(model, training))


def activation_bytes(model: TransformerConfig, training: TrainingConfig, shape: StepShape) -> int:
    """Bytes saved for backward in one step, each tensor at its dtype class's size."""
    return sum(s.nbytes(shape) for s in saved_tensors(model, training))


# --------------------------------------------------------------------------------------------
# Timeline events: a small simulation of the torch implementation's autograd graph.
#
# Forward records each tensor the model allocates, the autograd node that produces it (which
# tensors it saves, which inputs it sends gradients to) and when Python drops its last reference.
# A tensor is freed when it is dead and no node still saves it. Backward runs the nodes in reverse
# creation order (what torch's engine does on one device: the ready node with the highest sequence
# number goes first, and that is always the last one created), allocating each input gradient,
# accumulating fan-in gradients in place, freeing a node's incoming gradient and its saved tensors
# after it runs, and allocating each parameter's .grad (AccumulateGrad keeps the computed tensor).

PASS = "pass"  # an input whose gradient is the incoming gradient itself (add, views, cat)


@dataclass
class _T:
    name: str
    nbytes: int
    role: str = ""  # fixed when the events are materialised: activation if ever saved
    kind: str = "act"
    saved_by: int = 0
    ever_saved: bool = False
    dead: bool = False
    live: bool = True


@dataclass
class _Node:
    out: str
    inputs: list[tuple[str, bool]]  # (tensor or "param:<name>", passthrough)
    saves: list[str]
    block: int  # checkpointed block index, or -1
    scratch: int = 0  # bytes the node's backward allocates and frees while computing its gradients


class _Sim:
    """Builds the event list of one forward + backward."""

    def __init__(self, model: TransformerConfig, training: TrainingConfig, shape: StepShape) -> None:
        self.model, self.training, self.shape = model, training, shape
        self.seq = tokens_per_sequence(model, training)
        self.t = training.batch_size * self.seq
        self.autocast = shape.autocast
        self.fp32_stream = shape.parameter_bytes == 4
        self.params = {p.name: p.numel for p in parameter_tensors(model)}
        self.tensors: dict[str, _T] = {}
        self.records: list[tuple[str, _T, str]] = []  # ("alloc"|"free", tensor, phase)
        self.nodes: list[_Node] = []
        self.phase = "forward"
        self.ckpt_block = -1  # the checkpointed block being built (-1: none)
        self.recomputing = False
        self.block_inputs: dict[int, str] = {}
        self.casts: set[str] = set()
        self.grads_done: set[str] = set()

    # --- tensors -------------------------------------------------------------------------
    def new(self, name: str, numel: int, kind: Kind, role: str = "") -> str:
        name = self.new_bytes(name, numel * kind_bytes(kind, self.shape), role)
        self.tensors[name].kind = kind
        return name

    def new_bytes(self, name: str, nbytes: int, role: str = "") -> str:
        if name in self.tensors and self.tensors[name].live:
            raise AssertionError(f"{name} allocated twice")
        tensor = _T(name, nbytes, role)
        self.tensors[name] = tensor
        self.records.append(("alloc", tensor, self.phase))
        return name

    def _free(self, tensor: _T) -> None:
        if tensor.live:
            tensor.live = False
            self.records.append(("free", tensor, self.phase))

    def dead(self, *names: str) -> None:
        """Python dropped its last reference; free now unless a node saves the tensor."""
        for name in names:
            tensor = self.tensors[name]
            tensor.dead = True
            if tensor.saved_by == 0:
                self._free(tensor)

    def node(self, out: str, inputs: list[str | tuple[str, str]], saves: tuple[str, ...] = (),
             scratch: int = 0) -> None:
        ins = [(i, False) if isinstance(i, str) else (i[0], True) for i in inputs]
        if self.ckpt_block < 0 or self.recomputing:
            for s in saves:
                self.tensors[s].saved_by += 1
                self.tensors[s].ever_saved = True
        if not self.recomputing:
            self.nodes.append(_Node(out, ins, list(saves), self.ckpt_block, scratch))

    # --- layers --------------------------------------------------------------------------
    def linear(self, prefix: str, x: str, n_in: int, n_out: int, weight: str, bias: str | None,
               stop: bool = False) -> str:
        """``F.linear``; under autocast it casts its input (and, once per forward, the weight).

        ``stop``: checkpoint recomputation ends here, right after the inputs are saved.
        """
        t = self.t
        saves: list[str] = []
        cast = self.autocast and self.tensors[x].kind != "act"  # a 16-bit input is used as is
        if cast:
            xc = self.new(f"{prefix}.x16", n_in * t, "act")
            self.node(xc, [x])
            x = xc
        if self.autocast:  # cached casts, dropped when the forward's autocast region ends
            for param in (weight, bias):
                cast_name = f"{param}.16bit"
                if param and (cast_name not in self.tensors or not self.tensors[cast_name].live):
                    self.new(cast_name, self.params[param], "act", role="temporary")
                    self.casts.add(cast_name)
            saves = [f"{weight}.16bit"]
        if stop:
            for s in (x, *saves):
                self.tensors[s].saved_by += 1
            if cast:
                self.dead(x)
            return ""
        out = self.new(f"{prefix}.out", n_out * t, "act")
        tag = "param16" if self.autocast else "param"
        params = [f"{tag}:{weight}"] + ([f"{tag}:{bias}"] if bias else [])
        self.node(out, [*params, x], saves=(x, *saves))  # mm backward: weight grad, then input grad
        if cast:
            self.dead(x)
        return out

    def norm(self, prefix: str, x: str) -> str:
        m, t, d = self.model, self.t, self.model.d_model
        w, b = f"param:{prefix}.weight", f"param:{prefix}.bias"
        if m.norm == "layernorm":
            out = self.new(f"{prefix}.out", d * t, "stream")
            mean = self.new(f"{prefix}.mean", t, "stream")
            rstd = self.new(f"{prefix}.rstd", t, "stream")
            self.node(out, [x, w] + ([b] if m.norm_has_bias else []), saves=(x, mean, rstd))
            self.dead(mean, rstd)
            return out
        x32 = x
        if not self.fp32_stream:
            x32 = self.new(f"{prefix}.x_fp32", d * t, "fp32")
            self.node(x32, [x])
        sq = self.new(f"{prefix}.sq", d * t, "fp32")
        # pow backward: grad · 2 · x^1 materialises x^1 and 2·grad before the product.
        self.node(sq, [x32], saves=(x32,), scratch=2 * d * t * 4)
        ms = self.new(f"{prefix}.ms", t, "fp32")
        self.node(ms, [sq])
        self.dead(sq)
        mse = self.new(f"{prefix}.ms_eps", t, "fp32")
        self.node(mse, [(ms, PASS)])
        self.dead(ms)
        rstd = self.new(f"{prefix}.rstd", t, "fp32")
        self.node(rstd, [mse], saves=(rstd,))
        self.dead(mse)
        normed = self.new(f"{prefix}.normed" if self.fp32_stream else f"{prefix}.n32", d * t, "fp32")
        self.node(normed, [x32, rstd], saves=(x32, rstd), scratch=d * t * 4)  # grad·x32 before the sum
        if not self.fp32_stream:
            n32, normed = normed, self.new(f"{prefix}.normed", d * t, "stream")
            self.node(normed, [n32])
            self.dead(n32)
        out = self.new(f"{prefix}.out", d * t, "stream")
        self.node(out, [w, normed], saves=(normed,), scratch=d * t * kind_bytes("stream", self.shape))
        self.dead(normed, rstd)
        if x32 != x:
            self.dead(x32)
        return out

    def rope(self, prefix: str, x: str, heads: int) -> str:
        m, t = self.model, self.t
        r, h = m.rotary_dim, m.head_size
        a = self.new(f"{prefix}.xcos", heads * r * t, "act")
        self.node(a, [x], saves=("rope.cos",))
        n = self.new(f"{prefix}.neg", heads * (r // 2) * t, "act")
        self.node(n, [(x, PASS)])
        c = self.new(f"{prefix}.cat", heads * r * t, "act")
        self.node(c, [(n, PASS), (x, PASS)])
        self.dead(n)
        s = self.new(f"{prefix}.xsin", heads * r * t, "act")
        self.node(s, [c], saves=("rope.sin",))
        self.dead(c)
        rot = self.new(f"{prefix}.rot", heads * r * t, "act")
        self.node(rot, [(a, PASS), (s, PASS)])
        self.dead(a, s)
        if r == h:
            return rot
        out = self.new(f"{prefix}.roped", heads * h * t, "act")
        self.node(out, [(rot, PASS), (x, PASS)])
        self.dead(rot)
        return out

    def attention(self, p: str, x: str) -> str:
        m, t, seq = self.model, self.t, self.seq
        d, h, hq, hk = m.d_model, m.head_size, m.num_heads, m.kv_heads
        qb = f"{p}.attn.q_proj.bias" if m.qkv_has_bias else None
        kb = f"{p}.attn.k_proj.bias" if m.qkv_has_bias else None
        vb = f"{p}.attn.v_proj.bias" if m.qkv_has_bias else None
        q = self.linear(f"{p}.attn.q_proj", x, d, hq * h, f"{p}.attn.q_proj.weight", qb)
        k = self.linear(f"{p}.attn.k_proj", x, d, hk * h, f"{p}.attn.k_proj.weight", kb)
        v = self.linear(f"{p}.attn.v_proj", x, d, hk * h, f"{p}.attn.v_proj.weight", vb)
        if m.positions == "rope":
            q_lin, q = q, self.rope(f"{p}.attn.q", q, hq)
            self.dead(q_lin)
            k_lin, k = k, self.rope(f"{p}.attn.k", k, hk)
            self.dead(k_lin)
        temps = [q, k, v]
        if m.attention == "sdpa":
            y = self.new(f"{p}.attn.sdpa", hq * h * t, "act")
            lse = self.new(f"{p}.attn.lse", hq * t, "fp32")
            self.node(y, [q, k, v], saves=(q, k, v, y, lse))
            self.dead(lse)
        else:
            if 1 < hk < hq:  # repeat_kv: expand + reshape copies (a view when there is one kv head)
                k = self.new(f"{p}.attn.k_rep", hq * h * t, "act")
                self.node(k, [temps[1]])
                v = self.new(f"{p}.attn.v_rep", hq * h * t, "act")
                self.node(v, [temps[2]])
                self.dead(temps[1], temps[2])
                temps = [q]
            # matmul copies its operands into (B·H, ...) batches: q, kᵀ and v are never views here.
            qc = self.new(f"{p}.attn.qc", hq * h * t, "act")
            self.node(qc, [(q, PASS)])
            kc = self.new(f"{p}.attn.kc", hq * h * t, "act")
            self.node(kc, [(k, PASS)])
            scores = self.new(f"{p}.attn.scores", hq * seq * t, "act")
            self.node(scores, [qc, kc], saves=(qc, kc))
            self.dead(qc, kc)
            scaled = self.new(f"{p}.attn.scaled", hq * seq * t, "act")
            self.node(scaled, [scores])
            self.dead(scores)
            full = self.new(f"{p}.attn.mask_full", seq * seq, "act")  # torch.full(...).triu(1)
            mask = self.new(f"{p}.attn.mask", seq * seq, "act")
            self.dead(full)
            masked = self.new(f"{p}.attn.masked", hq * seq * t, "act")
            self.node(masked, [(scaled, PASS)])
            probs = self.new(f"{p}.attn.probs", hq * seq * t, "act")
            self.node(probs, [masked], saves=(probs,))
            self.dead(masked, scaled)  # `att` is rebound only once softmax has returned
            vc = self.new(f"{p}.attn.vc", hq * h * t, "act")
            self.node(vc, [(v, PASS)])
            pv = self.new(f"{p}.attn.pv", hq * h * t, "act")
            self.node(pv, [probs, vc], saves=(probs, vc))
            self.dead(vc)
            y = self.new(f"{p}.attn.y", hq * h * t, "act")
            self.node(y, [(pv, PASS)])
            # Locals `att` (probs) and `y` (pv) live until the attention forward returns.
            temps += [mask, probs, pv] + ([k, v] if 1 < hk < hq else [])
        ob = f"{p}.attn.o_proj.bias" if m.linear_bias else None
        out = self.linear(f"{p}.attn.o_proj", y, hq * h, d, f"{p}.attn.o_proj.weight", ob)
        self.dead(y, *temps)
        return out

    def mlp(self, p: str, x: str) -> str:
        m, t, d, f = self.model, self.t, self.model.d_model, self.model.ffn_dim

        def lin(name: str, x: str, n_in: int, n_out: int, stop: bool = False) -> str:
            return self.linear(f"{p}.mlp.{name}", x, n_in, n_out, f"{p}.mlp.{name}.weight",
                               f"{p}.mlp.{name}.bias" if m.linear_bias else None, stop=stop)

        if m.mlp == "swiglu":
            gate = lin("gate_proj", x, d, f)
            silu = self.new(f"{p}.mlp.silu", f * t, "act")
            self.node(silu, [gate], saves=(gate,))
            self.dead(gate)
            up = lin("up_proj", x, d, f)
            hidden = self.new(f"{p}.mlp.hidden", f * t, "act")
            self.node(hidden, [silu, up], saves=(silu, up))
            self.dead(silu, up)
        else:
            up = lin("up_proj", x, d, f)
            hidden = self.new(f"{p}.mlp.hidden", f * t, "act")
            self.node(hidden, [up], saves=(up,))
            self.dead(up)
        # Under checkpoint recomputation torch stops once down_proj's inputs are saved (early stop).
        out = lin("down_proj", hidden, f, d, stop=self.recomputing)
        self.dead(hidden)
        return out

    def block(self, i: int, x: str) -> str:
        """Block ``i`` on input ``x``; returns its output (the next block's input)."""
        m, t, d = self.model, self.t, self.model.d_model
        p = f"blocks.{i}"
        out_name = f"blocks.{i + 1}.x_in" if i + 1 < m.num_layers else f"{p}.x_out"
        h1 = self.norm(f"{p}.norm1", x)
        a = self.attention(p, h1)
        self.dead(h1)
        if m.parallel_residual:
            xa = self.new(f"{p}.x_attn", d * t, "stream")
            self.node(xa, [(x, PASS), (a, PASS)])
            self.dead(a)
            h2 = self.norm(f"{p}.norm2", x)
            mo = self.mlp(p, h2)
            self.dead(h2)
            if not mo:
                self.dead(xa)
                return ""
            out = self.new(out_name, d * t, "stream")
            self.node(out, [(xa, PASS), (mo, PASS)])
            self.dead(xa, mo)
            return out
        xm = self.new(f"{p}.x_mid", d * t, "stream")
        self.node(xm, [(x, PASS), (a, PASS)])
        self.dead(a)
        h2 = self.norm(f"{p}.norm2", xm)
        mo = self.mlp(p, h2)
        self.dead(h2)
        if not mo:
            self.dead(xm)
            return ""
        out = self.new(out_name, d * t, "stream")
        self.node(out, [(xm, PASS), (mo, PASS)])
        self.dead(xm, mo)
        return out

    # --- the step ------------------------------------------------------------------------
    def forward(self) -> None:
        m, t, d, seq = self.model, self.t, self.model.d_model, self.seq
        emb = self.new("tok_emb.out", d * t, "stream")
        self.node(emb, ["param:tok_emb.weight"])
        x = emb
        if m.positions == "learned":
            x = self.new("blocks.0.x_in", d * t, "stream")
            self.node(x, [(emb, PASS), "param:pos_emb.weight"])
            self.dead(emb)
        if m.positions == "rope":
            self.new("rope.cos", seq * m.rotary_dim, "act")
            self.new("rope.sin", seq * m.rotary_dim, "act")
        ckpt = self.training.activation_checkpointing == "full"
        for i in range(m.num_layers):
            if ckpt:
                # The checkpoint saves the block's inputs (its _NoopSaveInputs node) until the
                # block's backward is over: modelled as a marker node created before the block.
                kept = [x] + (["rope.cos", "rope.sin"] if m.positions == "rope" else [])
                self.node(f"ckpt{i}", [], saves=tuple(kept))
                self.ckpt_block, self.block_inputs[i] = i, x
                self.nodes[-1].block = i
            x_next = self.block(i, x)
            self.ckpt_block = -1
            self.dead(x)
            x = x_next
        if m.positions == "rope":
            self.dead("rope.cos", "rope.sin")
        hf = self.norm("norm_f", x)
        self.dead(x)
        head = "lm_head.weight" if not m.tie_embeddings else "tok_emb.weight"
        logits = self.linear("lm_head", hf, d, m.vocab_size, head, None)
        self.phase = "loss"
        loss_kind: Kind = "fp32" if self.autocast else "act"
        src = logits
        if self.autocast:
            src = self.new("logits.fp32", m.vocab_size * t, "fp32")
            self.node(src, [logits])
        logp = self.new("loss.log_probs", m.vocab_size * t, loss_kind)
        self.node(logp, [src], saves=(logp,))
        if src != logits:
            self.dead(src)
        loss = self.new("loss", 1, loss_kind, role="temporary")
        tw = self.new("loss.total_weight", 1, loss_kind)
        self.node(loss, [logp], saves=(logp, tw))
        self.dead(tw, logp, logits, hf)  # forward's locals (x, logits) live until it returns
        for cast in self.casts:  # autocast's weight cache is cleared when the forward ends
            if self.tensors[cast].live:
                self.dead(cast)

    def backward(self) -> None:
        self.phase = "backward"
        loss_kind: Kind = "fp32" if self.autocast else "act"
        grad_loss = self.new("grad.loss", 1, loss_kind, role="temporary")
        buffers: dict[str, str] = {"loss": grad_loss}
        refs: dict[str, int] = {grad_loss: 2}  # backward() keeps its own reference until the end
        count = 0

        def release(storage: str) -> None:
            refs[storage] -= 1
            if refs[storage] == 0:
                self._free(self.tensors[storage])

        recomputed: set[int] = set()
        for node in reversed(self.nodes):
            marker = node.out.startswith("ckpt")
            if node.block >= 0 and node.block not in recomputed and node.saves and not marker:
                recomputed.add(node.block)
                self._recompute(node.block)
            incoming = buffers.pop(node.out, None)
            later: list[Callable[[], None]] = []
            scratch = self.new_bytes(f"scratch#{id(node)}", node.scratch, "temporary") if node.scratch else ""
            for name, passthrough in node.inputs:
                if name.startswith("param"):
                    kind, _, pname = name.partition(":")
                    self._param_grad(pname, kind == "param16", later)
                    continue
                if passthrough and incoming is not None:
                    key = incoming
                    refs[key] += 1
                else:
                    count += 1
                    key = self.new_bytes(f"grad.{name}#{count}", self.tensors[name].nbytes, "temporary")
                    refs[key] = 1
                if name in buffers:  # fan-in: accumulate into the buffer that is not shared
                    old = buffers[name]
                    if refs[old] == 1:
                        release(key)
                    elif refs[key] == 1:
                        buffers[name] = key
                        release(old)
                    else:
                        count += 1
                        total = self.new_bytes(f"grad.{name}#{count}", self.tensors[name].nbytes, "temporary")
                        refs[total] = 1
                        buffers[name] = total
                        release(old)
                        release(key)
                else:
                    buffers[name] = key
            if scratch:
                self._free(self.tensors[scratch])
            if incoming is not None:
                release(incoming)
            for s in node.saves:
                tensor = self.tensors[s]
                tensor.saved_by -= 1
                if tensor.saved_by == 0 and tensor.dead:
                    self._free(tensor)
            for step in later:
                step()
        for key in list(buffers.values()):
            release(key)
        release(grad_loss)

    def _param_grad(self, name: str, via_cast: bool, later: list[Callable[[], None]]) -> None:
        """A parameter's gradient, as mm/embedding backward computes it and AccumulateGrad keeps it.

        The node allocates the gradient (16-bit when it reaches an autocast weight cast). What
        happens after the node has released its inputs goes to ``later``: the cast back to the
        parameter dtype (ToCopyBackward), and for a tied weight's second gradient the out-of-place
        ``.grad + new`` of AccumulateGrad.
        """
        numel = self.params[name]
        nbytes = numel * self.shape.gradient_bytes
        if via_cast:
            g16 = self.new(f"{name}.grad16", numel, "act", role="temporary")
        elif name in self.grads_done:
            g16 = self.new_bytes(f"{name}.grad_extra", nbytes, "temporary")
        elif name == "pos_emb.weight":  # the batch-summed (S, d) gradient, then slice_backward
            rows = self.new("pos_emb.grad_rows", self.seq * self.model.d_model, "stream")
            self.grads_done.add(name)
            self.new_bytes(f"{name}.grad", nbytes, "gradient")
            self._free(self.tensors[rows])
            return
        else:
            self.grads_done.add(name)
            self.new_bytes(f"{name}.grad", nbytes, "gradient")
            return

        def accumulate() -> None:
            if name not in self.grads_done:
                self.grads_done.add(name)
                self.new_bytes(f"{name}.grad", nbytes, "gradient")
                self._free(self.tensors[g16])
                return
            # Named so the final tensor keeps the name ``<param>.grad`` (zero_grad frees it).
            total = self.new_bytes(f"{name}.grad_sum", nbytes, "temporary")
            self._free(self.tensors[f"{name}.grad"])
            self._free(self.tensors[g16])
            self._free(self.tensors[total])
            self.new_bytes(f"{name}.grad", nbytes, "gradient")

        later.append(accumulate)

    def _recompute(self, i: int) -> None:
        """Checkpoint reruns block ``i``'s forward (up to down_proj's saved input) in backward."""
        before = {n for n in self.casts if self.tensors[n].live}
        self.recomputing, self.ckpt_block = True, i
        self.block(i, self.block_inputs[i])
        self.recomputing, self.ckpt_block = False, -1
        for cast in self.casts:  # the recompute's own autocast cache is dropped
            if cast not in before and self.tensors[cast].live and not self.tensors[cast].dead:
                self.dead(cast)

    def events(self) -> list[Event]:
        out: list[Event] = []
        for kind, tensor, phase in self.records:
            role = tensor.role or ("activation" if tensor.ever_saved else "temporary")
            fn = alloc if kind == "alloc" else free
            out.append(fn(tensor.name, role, tensor.nbytes, phase))
        return out


def step_events(model: TransformerConfig, training: TrainingConfig, shape: StepShape) -> list[Event]:
    """Forward, loss and backward events of one step (see the simulation notes above)."""
    sim = _Sim(model, training, shape)
    sim.forward()
    sim.backward()
    return sim.events()


# --------------------------------------------------------------------------------------------
# The family


@register_family("transformer")
class TransformerFamily:
    """Decoder-only transformers (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX); docs/transformer.md."""

    name = "transformer"

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
        )

    def input_events(self, model: TransformerConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """Token ids and targets, (B, S) int64 each."""
        tokens = batch.batch_size * tokens_per_sequence(model, batch)
        return [alloc("idx", "input", tokens * 8, "setup"), alloc("targets", "input", tokens * 8, "setup")]

    def forward_backward_events(self, model: TransformerConfig, batch: TrainingConfig,
                                shape: StepShape) -> list[Event]:
        """Every allocation and release of forward, loss and backward, in torch's order."""
        return step_events(model, batch, shape)

    def end_of_step_events(self, model: TransformerConfig, batch: TrainingConfig,
                           shape: StepShape) -> list[Event]:
        """The loss, held by the caller until the step is over."""
        loss_bytes = 4 if shape.autocast else shape.activation_bytes
        return [free("loss", "temporary", loss_bytes, "zero_grad")]
