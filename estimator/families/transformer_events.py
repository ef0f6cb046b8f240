"""Timeline events of the transformer family: a small simulation of our torch model's autograd graph.

Split from ``transformer.py`` (parameters, FLOPs, first-order activations): this module says in
which order forward, the loss and backward allocate and free each tensor, so the peak can be taken
(see docs/peak.md). Pure Python; checked against the live-tensor tracker in
``tests/transformer/test_events.py`` and against ``verify`` in docs/accuracy.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from estimator.config import TrainingConfig
from estimator.events import Event
from estimator.families.base import StepShape
from estimator.families.transformer import (
    Kind,
    TransformerConfig,
    kind_bytes,
    sharded_parameter_tensors,
    tokens_per_sequence,
)

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


@dataclass(frozen=True)
class TensorParallel:
    """A tensor-parallel rank's layout (docs/tp.md): degree, sequence parallelism, vocabulary-parallel loss."""

    size: int = 1
    sequence: bool = False
    loss: bool = False


@dataclass(slots=True)
class _T:
    name: str
    nbytes: int
    role: str = ""  # fixed when the events are materialised: activation if ever saved
    kind: str = "act"
    saved_by: int = 0
    ever_saved: bool = False
    dead: bool = False
    live: bool = True
    grad_nbytes: int | None = None  # a view that allocates nothing (a DTensor over a local tensor): its gradient's size


@dataclass(slots=True)
class _Node:
    out: str
    inputs: list[tuple[str, bool]]  # (tensor or "param:<name>", passthrough)
    saves: list[str]
    block: int  # checkpointed block index, or -1
    scratch: int = 0  # bytes the node's backward allocates and frees while computing its gradients
    opaque: bool = False  # its input gradients are collective outputs: never summed into in place
    then: str = ""  # autocast's cast of its input: that cast's backward runs before the weights' casts back


class _Sim:
    """Builds the event list of one forward + backward."""

    def __init__(self, model: TransformerConfig, training: TrainingConfig, shape: StepShape,
                 tp: TensorParallel | None = None) -> None:
        self.model, self.training, self.shape = model, training, shape
        self.seq = tokens_per_sequence(model, training)
        self.t = training.batch_size * self.seq
        self.autocast = shape.autocast
        self.fp32_stream = shape.parameter_bytes == 4
        # tensor parallelism (docs/tp.md): this rank's shards of heads, d_ff and vocabulary
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.tp_size = self.tp.size if self.tp else 1
        # sequence parallelism: the residual stream, norms and adds hold S/t of each sequence (Shard(1))
        self.sp = bool(self.tp and self.tp.sequence)
        self.tl = self.t // self.tp_size if self.sp else self.t
        self.params = {p.name: p.numel for p in sharded_parameter_tensors(model, self.tp_size)}
        # DTensor's embedding backward makes the whole (V, d) gradient; the Shard(0) .grad is a view of it
        self.grad_numel = {"tok_emb.weight": model.vocab_size * model.d_model} if self.tp else {}
        self.opaque: set[str] = set()  # gradient buffers that are collective outputs (summed out of place)
        self.tensors: dict[str, _T] = {}
        self.records: list[tuple[str, _T, str]] = []  # ("alloc"|"free", tensor, phase)
        self.nodes: list[_Node] = []
        self.phase = "forward"
        self.ckpt_block = -1  # the checkpointed block being built (-1: none)
        self.recomputing = False
        self.block_inputs: dict[int, str] = {}
        self.casts: set[str] = set()
        self.grads_done: set[str] = set()
        # where FSDP2's hooks run (estimator/parallel/fsdp.py): (index into records, hook, unit)
        self.marks: list[tuple[int, str, str]] = []
        self.unit_outputs: dict[str, str] = {}  # the tensor a block returns -> the block ("blocks.i")
        self.first_block_input = ""
        self.cache: list[str] = []  # transformers' DynamicCache: the k and v copies (kv_cache)
        self.base_of: dict[str, str] = {}  # slices of a fused projection's output -> that output
        self.view_of: dict[str, str] = {}  # a head view (no storage; its own backward node) -> the tensor it views

    def mark(self, hook: str, unit: str) -> None:
        self.marks.append((len(self.records), hook, unit))

    # --- tensors -------------------------------------------------------------------------
    def new(self, name: str, numel: int, kind: Kind, role: str = "") -> str:
        return self.new_bytes(name, numel * kind_bytes(kind, self.shape), role, kind)

    def new_bytes(self, name: str, nbytes: int, role: str = "", kind: str = "act") -> str:
        tensors = self.tensors
        old = tensors.get(name)
        if old is not None and old.live:
            raise AssertionError(f"{name} allocated twice")
        tensor = tensors[name] = _T(name, nbytes, role, kind)
        self.records.append(("alloc", tensor, self.phase))
        return name

    def _free(self, tensor: _T) -> None:
        if tensor.live:
            tensor.live = False
            self.records.append(("free", tensor, self.phase))

    def alias(self, name: str, of: str) -> str:
        """A DTensor made ``from_local`` over ``of``: no storage of its own, a gradient of ``of``'s size."""
        tensor = _T(name, 0, live=False)
        tensor.grad_nbytes = self.grad_size(of)
        self.tensors[name] = tensor
        return name

    def grad_size(self, name: str) -> int:
        tensor = self.tensors[name]
        return tensor.nbytes if tensor.grad_nbytes is None else tensor.grad_nbytes

    def dead(self, *names: str) -> None:
        """Python dropped its last reference; free now unless a node saves the tensor (a head view: its base)."""
        for name in names:
            if name in self.view_of:
                self.dead(self.view_of[name])
            tensor = self.tensors[name]
            tensor.dead = True
            if tensor.saved_by == 0:
                self._free(tensor)

    def node(self, out: str, inputs: list[str | tuple[str, str]], saves: tuple[str, ...] = (),
             scratch: int = 0, opaque: bool = False) -> None:
        ins = [(i, False) if isinstance(i, str) else (i[0], True) for i in inputs]
        if saves:
            base_of = self.base_of  # a saved view keeps its base's storage
            saves = tuple([base_of.get(s, s) for s in saves]) if base_of else tuple(saves)
            if self.ckpt_block < 0 or self.recomputing:
                tensors = self.tensors
                for s in saves:
                    tensor = tensors[s]
                    tensor.saved_by += 1
                    tensor.ever_saved = True
        if not self.recomputing:
            self.nodes.append(_Node(out, ins, list(saves), self.ckpt_block, scratch, opaque))

    # --- layers --------------------------------------------------------------------------
    def slices(self, prefix: str, base: str, widths: list[int], heads: bool = False) -> list[str]:
        """``base[..., a:b]`` for consecutive widths (a fused projection's output, transformers' Phi-3 order).

        A slice allocates nothing; its backward (``SliceBackward0``) makes a zero gradient of the base's full size
        and copies the slice's gradient into it, so the base receives one full-size gradient per slice, summed.
        ``heads``: each slice is followed by its head view (:meth:`head_view`), as the math attention needs.
        """
        out = []
        for j, width in enumerate(widths):
            name = f"{prefix}.slice{j}"
            tensor = _T(name, 0, kind=self.tensors[base].kind, live=False)
            tensor.grad_nbytes = width * self.t * kind_bytes(self.tensors[base].kind, self.shape)  # type: ignore[arg-type]
            self.tensors[name] = tensor
            self.base_of[name] = base
            self.node(name, [base])
            out.append(self.head_view(name) if heads else name)
        return out

    def head_view(self, x: str) -> str:
        """``x.view(B, S, heads, h).transpose(1, 2)`` when torch's math attention uses the heads: its backward gets
        a (B, H, S, h)-contiguous gradient, which ``ViewBackward0`` reshapes to (B, S, H·h), a copy (measured with
        the tracker). The view has no storage; :meth:`dead` on it drops ``x``."""
        name = self.alias(f"{x}.heads", x)
        self.view_of[name] = x
        self.node(name, [x])
        return name

    def dropout(self, prefix: str, x: str, stop: bool = False) -> str:
        """``F.dropout(x, p)`` in training on the CPU: torch's ``_dropout_impl`` (aten/src/ATen/native/Dropout.cpp,
        taken because ``is_fused_kernel_acceptable`` is false off CUDA): ``noise = empty_like(x).bernoulli_(1 - p)
        .div_(1 - p)`` in x's dtype, then ``x * noise``; the product saves the noise (x needs a gradient, the noise
        does not), its backward makes ``grad * noise``. The bytes do not depend on the mask's values.

        ``stop``: checkpoint recomputation ends as the product saves the noise (before its output exists).
        """
        kind: Kind = self.tensors[x].kind  # type: ignore[assignment]
        numel = self.tensors[x].nbytes // kind_bytes(kind, self.shape)
        noise = self.new(f"{prefix}.noise", numel, kind)
        if stop:
            self.tensors[noise].saved_by += 1
            self.dead(noise)
            return ""
        out = self.new(f"{prefix}.dropped", numel, kind)
        self.node(out, [x], saves=(noise,))
        self.dead(noise)
        return out

    def linear(self, prefix: str, x: str, n_in: int, n_out: int, weight: str, bias: str | None,
               stop: bool = False, split: str = "") -> str:
        """``F.linear``; under autocast it casts its input (and, once per forward, the weight).

        ``stop``: checkpoint recomputation ends here, right after the inputs are saved.
        ``split`` (tensor parallelism, ``n_in``/``n_out`` already this rank's): "col" for
        ``ColwiseParallel`` (its input hook makes a DTensor ``from_local``, whose backward all-reduces
        the input gradient into a new buffer), "row" for ``RowwiseParallel`` (the partial output is
        all-reduced into a new buffer and dropped; the backward passes the gradient through).
        """
        t = self.t
        saves: list[str] = []
        x_saved = x
        if self.tp and split == "col":
            xd = self.alias(f"{prefix}.x_dtensor", x)
            # without SP from_local's backward all-reduces the partial input gradient into a new tensor;
            # with SP the gather before it reduce-scatters the sum instead, and from_local passes it on
            self.node(xd, [(x, PASS)] if self.sp else [x], opaque=True)
            x = xd
        cast = self.autocast and self.tensors[x_saved].kind != "act"  # a 16-bit input is used as is
        if cast:
            xc = self.new(f"{prefix}.x16", n_in * t, "act")
            self.node(xc, [x])
            x = x_saved = xc
        if self.autocast:  # cached casts, dropped when the forward's autocast region ends
            for param in (weight, bias):
                cast_name = f"{param}.16bit"
                if param and (cast_name not in self.tensors or not self.tensors[cast_name].live):
                    self.new(cast_name, self.params[param], "act", role="temporary")
                    self.casts.add(cast_name)
            saves = [f"{weight}.16bit"]
        if stop:
            for s in (x_saved, *saves):
                self.tensors[s].saved_by += 1
            if cast:
                self.dead(x_saved)
            return ""
        out = self.new(f"{prefix}.out", n_out * t, "act")
        tag = "param16" if self.autocast else "param"
        params = [f"{tag}:{weight}"] + ([f"{tag}:{bias}"] if bias else [])
        self.node(out, [*params, x], saves=(x_saved, *saves))  # mm backward: weight grad, then input grad
        if cast and not self.recomputing:  # the input's cast was made after the weight's: its backward goes first
            self.nodes[-1].then = x_saved
        if cast:
            self.dead(x_saved)
        if self.tp and split == "row" and self.sp:  # Partial -> Shard(1): a reduce-scatter
            out = self.reduce_scatter(prefix, out, n_out, "act")
        elif self.tp and split == "row":  # Partial -> Replicate: an all-reduce into a new tensor
            reduced = self.new(f"{prefix}.reduced", n_out * t, "act")
            self.node(reduced, [(out, PASS)])
            self.dead(out)
            out = reduced
        return out

    def reduce_scatter(self, prefix: str, x: str, width: int, kind: Kind) -> str:
        """Partial -> Shard(1) (SP): the sequence chunks are laid out with a ``cat`` (a full-size copy),
        reduce-scattered into a new S/t tensor, the copy and the partial tensor dropped. Its backward
        all-gathers the gradient (a flat buffer, then the ``cat`` into a full-size gradient)."""
        full = width * self.t * kind_bytes(kind, self.shape)
        cat = self.new_bytes(f"{prefix}.rs_layout", full, "temporary")
        out = self.new(f"{prefix}.scattered", width * self.tl, kind)
        self.node(out, [x], scratch=full)
        self._free(self.tensors[cat])
        self.dead(x)
        return out

    def gather(self, prefix: str, x: str) -> str:
        """Shard(1) -> Replicate (SP, ``PrepareModuleInput`` and the head's input): all-gather into a flat
        buffer, ``cat`` into the full tensor, drop the buffer. Its backward reduce-scatters the gradient
        (the ``cat`` layout copy, then an S/t gradient)."""
        kind = self.tensors[x].kind
        size = self.model.d_model * self.t
        buf = self.new(f"{prefix}.all_gather", size, kind, role="temporary")  # type: ignore[arg-type]
        full = self.new(f"{prefix}.gathered", size, kind)  # type: ignore[arg-type]
        self.node(full, [x], scratch=size * kind_bytes(kind, self.shape))
        self._free(self.tensors[buf])
        return full

    def norm(self, prefix: str, x: str) -> str:
        m, t, d = self.model, self.tl, self.model.d_model
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
        # rope_stream_dtype: cos and sin in the stream's dtype; under autocast x (16-bit) times them is promoted to
        # fp32, and the product's backward makes an fp32 gradient that the engine casts to x's dtype (scratch)
        kind: Kind = self.rope_kind
        promoted = kind_bytes(kind, self.shape) != kind_bytes("act", self.shape)
        a = self.new(f"{prefix}.xcos", heads * r * t, kind)
        self.node(a, [x], saves=("rope.cos",), scratch=self.tensors[a].nbytes if promoted else 0)
        n = self.new(f"{prefix}.neg", heads * (r // 2) * t, "act")
        self.node(n, [(x, PASS)])
        c = self.new(f"{prefix}.cat", heads * r * t, "act")
        self.node(c, [(n, PASS), (x, PASS)])
        self.dead(n)
        s = self.new(f"{prefix}.xsin", heads * r * t, kind)
        self.node(s, [c], saves=("rope.sin",), scratch=self.tensors[s].nbytes if promoted else 0)
        self.dead(c)
        rot = self.new(f"{prefix}.rot", heads * r * t, kind)
        self.node(rot, [(a, PASS), (s, PASS)])
        self.dead(a, s)
        if r == h and not getattr(m, "rope_concat", False):
            return rot
        out = self.new(f"{prefix}.roped", heads * h * t, kind)
        self.node(out, [(rot, PASS), (x, PASS)])
        self.dead(rot)
        return out

    @property
    def rope_kind(self) -> Kind:
        """The dtype class of cos, sin and RoPE's products: the stream's with ``rope_stream_dtype``."""
        return "stream" if getattr(self.model, "rope_stream_dtype", False) else "act"

    @property
    def kv_cached(self) -> bool:
        """transformers' DynamicCache in the training forward (``kv_cache``; off under checkpointing)."""
        return getattr(self.model, "kv_cache", False) and self.training.activation_checkpointing != "full"

    def kv_copies(self, p: str, k: str, v: str, width: int) -> tuple[str, str]:
        """``DynamicLayer.update`` (transformers/cache_utils.py): ``torch.cat([empty, k])`` and the same for v; the
        copies are kept by the cache until the forward returns (``self.cache``), the originals dropped."""
        out = []
        for name, src in (("k", k), ("v", v)):
            copy = self.new(f"{p}.attn.{name}_cache", width * self.t, self.tensors[src].kind)  # type: ignore[arg-type]
            self.node(copy, [(src, PASS)])
            self.dead(src)
            self.cache.append(copy)
            out.append(copy)
        return out[0], out[1]

    def sdpa(self, p: str, q: str, k: str, v: str, width: int) -> str:
        """SDPA (flash kernel): saves q, k, v, its output and the fp32 logsumexp. Under autocast it casts its fp32
        inputs (RoPE's products under ``rope_stream_dtype``) to 16 bits, and saves the casts."""
        ins = [q, k, v]
        if self.autocast:
            for j, name in enumerate(ins):
                if self.tensors[name].kind != "act":
                    ins[j] = self.new(f"{name}.16bit", self.tensors[name].nbytes // 4, "act")
                    self.node(ins[j], [name])
        y = self.new(f"{p}.attn.sdpa", width * self.t, "act")
        lse = self.new(f"{p}.attn.lse", width // self.model.head_size * self.t, "fp32")
        self.node(y, ins, saves=(*ins, y, lse))
        self.dead(lse, *[c for c, o in zip(ins, (q, k, v), strict=True) if c != o])
        return y

    @property
    def math_attention(self) -> bool:
        """Attention dropout with ``attention: sdpa``: on the CPU ``scaled_dot_product_attention`` with ``dropout_p``
        runs torch's composite ``_scaled_dot_product_attention_math`` (transformers' GPT-2 passes attn_pdrop)."""
        return getattr(self.model, "attn_dropout", 0.0) > 0 and self.model.attention == "sdpa"

    def sdpa_math(self, p: str, q: str, k: str, v: str, width: int) -> str:
        """torch's ``_scaled_dot_product_attention_math`` with dropout, op by op as the tracker sees it (CPU).

        16-bit q, k, v are copied to fp32 first (the math kernel upcasts; its outputs are cast back). ``q·√s`` and
        ``kᵀ·√s`` (s = 1/√h) are new tensors; ``matmul`` copies an operand that is not laid out (B·H, ...) (q
        always here, k and v unless they are the cache's contiguous copies) and saves what it multiplies; the
        causal mask is a (S, S) ``where`` of a bool ``tril`` (alive until the function returns, like ``q·√s``);
        the scores plus the mask, ``_safe_softmax`` (saves its output), dropout (a noise tensor saved by its
        product), then ``probs @ v``. In 16-bit the (B, H, S, S) weights are also cast back (returned, dropped).
        Saved: three (B, H, S, h) and three (B, H, S, S) fp32 tensors. The output is laid out (B, H, S, h).
        """
        m, t, seq = self.model, self.t, self.seq
        heads = width // m.head_size
        up = kind_bytes("act", self.shape) != 4
        contiguous = self.kv_cached  # the cache's copies are (B, H, S, h)-contiguous; head views are not
        qf, kf, vf = q, k, v
        if up:  # _to_copy to fp32, one per input
            qf, kf, vf = (self.new(f"{p}.attn.{n}_fp32", width * t, "fp32") for n in "qkv")
            for copy, src in ((qf, q), (kf, k), (vf, v)):
                self.node(copy, [src])
        qs = self.new(f"{p}.attn.q_scaled", width * t, "fp32")
        self.node(qs, [qf])
        for name, nbytes in (("ones", seq * seq), ("tril", seq * seq)):
            self.new_bytes(f"{p}.attn.mask_{name}", nbytes, "temporary")
        self._free(self.tensors[f"{p}.attn.mask_ones"])
        scalars = [self.new_bytes(f"{p}.attn.mask_scalar{j}", 4, "temporary") for j in range(2)]
        mask = self.new(f"{p}.attn.mask", seq * seq, "fp32")
        for name in reversed(scalars):
            self._free(self.tensors[name])
        self._free(self.tensors[f"{p}.attn.mask_tril"])
        ks = self.new(f"{p}.attn.k_scaled", width * t, "fp32")
        self.node(ks, [kf])
        qc = self.new(f"{p}.attn.q_batched", width * t, "fp32")
        self.node(qc, [(qs, PASS)])
        kc = ks
        if not contiguous:
            kc = self.new(f"{p}.attn.k_batched", width * t, "fp32")
            self.node(kc, [(ks, PASS)])
        scores = self.new(f"{p}.attn.scores", heads * seq * t, "fp32")
        self.node(scores, [qc, kc], saves=(qc, kc))
        self.dead(qc, kc, ks)
        masked = self.new(f"{p}.attn.masked", heads * seq * t, "fp32")
        self.node(masked, [(scores, PASS)])
        self.dead(scores)
        probs = self.new(f"{p}.attn.probs", heads * seq * t, "fp32")
        self.node(probs, [masked], saves=(probs,))
        self.dead(masked)
        dropped = self.dropout(f"{p}.attn.probs", probs)
        self.dead(probs)
        weights16 = self.new_bytes(f"{p}.attn.weights16", heads * seq * t * 2, "temporary") if up else ""
        vc = vf
        if not contiguous:
            vc = self.new(f"{p}.attn.v_batched", width * t, "fp32")
            self.node(vc, [(vf, PASS)])
        out = self.new(f"{p}.attn.pv", width * t, "fp32")
        self.node(out, [dropped, vc], saves=(dropped, vc))
        self.dead(dropped, *([vc] if vc != v else []))  # v itself: the cache's copy
        if up:
            out16 = self.new(f"{p}.attn.pv16", width * t, "act")
            self.node(out16, [out])
            self.dead(out)
            out = out16
        self.dead(qs, mask)
        if up:
            self.dead(vf, kf, qf)
            self._free(self.tensors[weights16])
        return out

    def attention(self, p: str, x: str) -> str:
        m, t, seq = self.model, self.t, self.seq
        d, h, hq, hk = m.d_model, m.head_size, m.num_heads // self.tp_size, m.kv_heads // self.tp_size
        gathered = self.gather(f"{p}.attn", x) if self.sp else ""
        x = gathered or x
        qb = f"{p}.attn.q_proj.bias" if m.qkv_has_bias else None
        kb = f"{p}.attn.k_proj.bias" if m.qkv_has_bias else None
        vb = f"{p}.attn.v_proj.bias" if m.qkv_has_bias else None
        fused = ""
        if getattr(m, "fused_qkv", False):  # one projection, q/k/v its slices (transformers' Phi-3)
            fb = f"{p}.attn.qkv_proj.bias" if m.qkv_has_bias else None
            fused = self.linear(f"{p}.attn.qkv_proj", x, d, (hq + 2 * hk) * h, f"{p}.attn.qkv_proj.weight", fb)
            q, k, v = self.slices(f"{p}.attn.qkv", fused, [hq * h, hk * h, hk * h], heads=self.math_attention)
        else:
            q = self.linear(f"{p}.attn.q_proj", x, d, hq * h, f"{p}.attn.q_proj.weight", qb, split="col")
            q = self.head_view(q) if self.math_attention else q
            k = self.linear(f"{p}.attn.k_proj", x, d, hk * h, f"{p}.attn.k_proj.weight", kb, split="col")
            k = self.head_view(k) if self.math_attention else k
            v = self.linear(f"{p}.attn.v_proj", x, d, hk * h, f"{p}.attn.v_proj.weight", vb, split="col")
            v = self.head_view(v) if self.math_attention else v
        if m.positions == "rope":
            q_lin, q = q, self.rope(f"{p}.attn.q", q, hq)
            self.dead(q_lin)
            k_lin, k = k, self.rope(f"{p}.attn.k", k, hk)
            self.dead(k_lin)
        temps = [q, k, v]
        if self.kv_cached:
            k, v = self.kv_copies(p, k, v, hk * h)
            temps = [q]
        if self.math_attention:  # attention dropout: torch's math kernel; its (B, H, S, h) output copied for o_proj
            temps.append(self.sdpa_math(p, q, k, v, hq * h))
            y = self.new(f"{p}.attn.y", hq * h * t, "act")
            self.node(y, [temps[-1]])
        elif m.attention == "sdpa":
            y = self.sdpa(p, q, k, v, hq * h)
            if getattr(m, "rope_concat", False):  # (B, H, S, h) output: transpose + reshape copies it
                temps.append(y)
                y = self.new(f"{p}.attn.y", hq * h * t, "act")
                self.node(y, [(temps[-1], PASS)])
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
            if getattr(m, "attn_dropout", 0.0) > 0:  # transformers' eager_attention_forward drops the weights
                dropped = self.dropout(f"{p}.attn.probs", probs)
                self.dead(probs)
                probs = dropped
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
        out = self.linear(f"{p}.attn.o_proj", y, hq * h, d, f"{p}.attn.o_proj.weight", ob, split="row")
        if getattr(m, "resid_dropout", 0.0) > 0:  # GPT2Attention.resid_dropout
            if y == f"{p}.attn.y" and m.attention == "sdpa":  # o_proj's copied input: a temporary of that call
                self.dead(y)
            temps.append(out)
            out = self.dropout(f"{p}.attn.o_proj", out)
        self.dead(y, *temps)
        if fused:  # the local `qkv` lives until the attention returns
            self.dead(fused)
        if gathered:  # the module's input, dropped when it returns
            self.dead(gathered)
        return out

    def mlp(self, p: str, x: str) -> str:
        m, t, d, f = self.model, self.t, self.model.d_model, self.model.ffn_dim // self.tp_size

        def lin(name: str, x: str, n_in: int, n_out: int, stop: bool = False) -> str:
            return self.linear(f"{p}.mlp.{name}", x, n_in, n_out, f"{p}.mlp.{name}.weight",
                               f"{p}.mlp.{name}.bias" if m.linear_bias else None, stop=stop,
                               split="row" if name == "down_proj" else "col")

        gathered = self.gather(f"{p}.mlp", x) if self.sp else ""
        x = gathered or x
        if m.mlp == "swiglu" and getattr(m, "fused_gate_up", False):  # transformers' Phi-3: one gate_up_proj
            fused = lin("gate_up_proj", x, d, 2 * f)
            gate, up = self.slices(f"{p}.mlp.gate_up", fused, [f, f])
            silu = self.new(f"{p}.mlp.silu", f * t, "act")
            self.node(silu, [gate], saves=(gate,))
            hidden = self.new(f"{p}.mlp.hidden", f * t, "act")
            self.node(hidden, [up, silu], saves=(up, silu))
            self.dead(silu, fused)
        elif m.mlp == "swiglu":
            gate = lin("gate_proj", x, d, f)
            silu = self.new(f"{p}.mlp.silu", f * t, "act")
            self.node(silu, [gate], saves=(gate,))
            self.dead(gate)
            up = lin("up_proj", x, d, f)
            hidden = self.new(f"{p}.mlp.hidden", f * t, "act")
            self.node(hidden, [silu, up], saves=(silu, up))
            self.dead(silu, up)
        elif m.mlp == "gelu_new":
            up = lin("up_proj", x, d, f)
            hidden = self.gelu_new(f"{p}.mlp", up, f * t)
            self.dead(up)
        else:
            up = lin("up_proj", x, d, f)
            hidden = self.new(f"{p}.mlp.hidden", f * t, "act")
            self.node(hidden, [up], saves=(up,))
            self.dead(up)
        # Under checkpoint recomputation torch stops once down_proj's inputs are saved (early stop), or with
        # dropout after it once its noise is saved (the last tensor the block saves).
        drop = getattr(m, "resid_dropout", 0.0) > 0
        out = lin("down_proj", hidden, f, d, stop=self.recomputing and not drop)
        if drop and out:  # GPT2MLP.dropout
            c_proj, out = out, self.dropout(f"{p}.mlp.down_proj", out, stop=self.recomputing)
            self.dead(c_proj)
        self.dead(hidden)
        if gathered:
            self.dead(gathered)
        return out

    def gelu_new(self, prefix: str, x: str, n: int) -> str:
        """transformers' ``NewGELUActivation`` (transformers/activations.py, 5.24), op by op in Python's order:
        ``0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))``.

        ``0.5·x`` first (a product by a number saves nothing); ``pow`` saves x and its backward makes x² and 3·x²
        before the product with the gradient; ``tanh`` saves its output; ``1 + tanh`` saves nothing; the last
        product saves both factors. Every tensor is the size of x (n elements, the activation dtype).
        """
        half = self.new(f"{prefix}.half_x", n, "act")
        self.node(half, [x])
        cube = self.new(f"{prefix}.cube", n, "act")
        self.node(cube, [x], saves=(x,), scratch=2 * n * kind_bytes("act", self.shape))
        scaled = self.new(f"{prefix}.cube_scaled", n, "act")
        self.node(scaled, [cube])
        self.dead(cube)
        inner = self.new(f"{prefix}.inner", n, "act")
        self.node(inner, [(x, PASS), (scaled, PASS)])
        self.dead(scaled)
        arg = self.new(f"{prefix}.tanh_arg", n, "act")
        self.node(arg, [inner])
        self.dead(inner)
        th = self.new(f"{prefix}.tanh", n, "act")
        self.node(th, [arg], saves=(th,))
        self.dead(arg)
        one = self.new(f"{prefix}.one_plus_tanh", n, "act")
        self.node(one, [(th, PASS)])
        self.dead(th)
        hidden = self.new(f"{prefix}.hidden", n, "act")
        self.node(hidden, [half, one], saves=(half, one))
        self.dead(half, one)
        return hidden

    def block(self, i: int, x: str) -> str:
        """Block ``i`` on input ``x``; returns its output (the next block's input)."""
        m, t, d = self.model, self.tl, self.model.d_model
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
        self.mark("pre_forward", "root")
        emb = self.new("tok_emb.out", d * t, "stream")
        self.node(emb, ["paramlookup:tok_emb.weight" if self.tp else "param:tok_emb.weight"])
        if self.tp:  # RowwiseParallel embedding: a masked local lookup (a 0-dim tensor), then an all-reduce
            self._free(self.tensors[self.new_bytes("tok_emb.mask_fill", 4, "temporary")])
        if self.sp:  # ... or a reduce-scatter into the sequence-sharded stream
            emb = self.reduce_scatter("tok_emb", emb, d, "stream")
        elif self.tp:
            reduced = self.new("tok_emb.reduced", d * t, "stream")
            self.node(reduced, [(emb, PASS)])
            self.dead(emb)
            emb = reduced
        x = emb
        embd_dropout = getattr(m, "embd_dropout", 0.0) > 0
        if m.positions == "learned":
            x = self.new("emb.sum" if embd_dropout else "blocks.0.x_in", d * t, "stream")
            self.node(x, [(emb, PASS), "param:pos_emb.weight"])
            self.dead(emb)
        if embd_dropout:  # GPT2Model.drop
            x, summed = self.dropout("emb", x), x
            self.dead(summed)
        if m.positions == "rope":
            self.new("rope.cos", seq * m.rotary_dim, self.rope_kind)
            self.new("rope.sin", seq * m.rotary_dim, self.rope_kind)
        ckpt = self.training.activation_checkpointing == "full"
        self.first_block_input = x
        for i in range(m.num_layers):
            if ckpt:
                # The checkpoint saves the block's inputs (its _NoopSaveInputs node) until the
                # block's backward is over: modelled as a marker node created before the block.
                kept = [x] + (["rope.cos", "rope.sin"] if m.positions == "rope" else [])
                self.node(f"ckpt{i}", [], saves=tuple(kept))
                self.ckpt_block, self.block_inputs[i] = i, x
                self.nodes[-1].block = i
            self.mark("pre_forward", f"blocks.{i}")
            x_next = self.block(i, x)
            self.mark("post_forward", f"blocks.{i}")
            self.unit_outputs[x_next] = f"blocks.{i}"
            self.ckpt_block = -1
            self.dead(x)
            x = x_next
        if m.positions == "rope":
            self.dead("rope.cos", "rope.sin")
        hf = self.norm("norm_f", x)
        self.dead(x)
        head = "lm_head.weight" if not m.tie_embeddings else "tok_emb.weight"
        head_in = self.gather("lm_head", hf) if self.sp else hf
        logits = self.linear("lm_head", head_in, d, m.vocab_size // self.tp_size, head, None, split="col")
        if self.tp and not self.tp.loss:  # ColwiseParallel head, Replicate output: all-gather, then cat
            gathered = self.new("lm_head.all_gather", m.vocab_size * t, "act", role="temporary")
            full = self.new("lm_head.logits", m.vocab_size * t, "act")
            self.node(full, [logits])
            self.dead(gathered, logits)
            logits = full
        if head_in != hf:  # the head's input hook's gathered tensor, dropped when lm_head returns
            self.dead(head_in)
        self.phase = "loss"
        if self.hf_loss:
            loss, logp, tw = self.hf_causal_lm_loss(logits)
        else:
            loss, logp, tw = self.cross_entropy(logits)
        self.after_loss(loss)
        self.dead(tw, logp, logits, hf)  # forward's locals (x, logits) live until it returns
        self.dead(*self.cache)  # transformers' cache, in the output object that is dropped before backward
        self.mark("post_forward", "root")
        for cast in self.casts:  # autocast's weight cache is cleared when the forward ends
            if self.tensors[cast].live:
                self.dead(cast)

    @property
    def hf_loss(self) -> bool:
        """transformers' causal-LM loss (``loss_upcast`` or ``labels_from_inputs``; the MoE config has neither)."""
        return bool(getattr(self.model, "loss_upcast", False) or getattr(self.model, "labels_from_inputs", False))

    def cross_entropy(self, logits: str) -> tuple[str, str, str]:
        """``F.cross_entropy(logits, targets)``: log_softmax (saves its output), then nll_loss (saves it and the
        0-dim total weight); under autocast it runs on an fp32 copy of the logits. Returns (loss, log-probs,
        total weight)."""
        m, t = self.model, self.t
        loss_kind: Kind = "fp32" if self.autocast else "act"
        src = logits
        # loss_parallel: the log-softmax and NLL of the vocabulary-sharded logits (their max, sum and
        # target picks all-reduced, T elements each); its backward writes into the NLL's gradient
        vocab = m.vocab_size // self.tp_size if self.tp and self.tp.loss else m.vocab_size
        if self.autocast:
            src = self.new("logits.fp32", vocab * t, "fp32")
            self.node(src, [logits])
        logp = self.new("loss.log_probs", vocab * t, loss_kind)
        self.node(logp, [(src, PASS)] if self.tp and self.tp.loss else [src], saves=(logp,))
        if src != logits and not self.tp:
            self.dead(src)
        loss = self.new("loss", 1, loss_kind, role="temporary")
        tw = self.new("loss.total_weight", 1, loss_kind)
        self.node(loss, [logp], saves=(logp, tw))
        if src != logits and self.tp:  # measured under TP: autocast's fp32 copy lives until cross_entropy returns
            self.dead(src)
        return loss, logp, tw

    def hf_causal_lm_loss(self, logits: str) -> tuple[str, str, str]:
        """transformers' ``ForCausalLMLoss`` (transformers/loss/loss_utils.py, 5.24) as the torch model runs it.

        ``logits = logits.float()`` (``loss_upcast``; a copy unless the logits are fp32 already, alive until
        the loss function returns); with ``labels_from_inputs`` the labels are the ids: ``F.pad(labels, (0,
        1), value=-100)`` (a [B, S+1] int64 tensor, alive until the function returns) and ``labels[..., 1:]
        .contiguous()`` (a [B, S] int64 copy, which nll_loss saves as its target). Then ``cross_entropy``:
        log_softmax saves its fp32 output, nll_loss saves it, the target and the fp32 total weight.
        """
        m, t = self.model, self.t
        upcast = getattr(m, "loss_upcast", False)
        src = logits
        if upcast and self.tensors[logits].nbytes != m.vocab_size * t * 4:
            src = self.new("logits.fp32", m.vocab_size * t, "fp32")
            self.node(src, [logits])
        elif self.autocast:  # labels from the inputs alone: autocast's own fp32 copy, inside cross_entropy
            src = ""
        padded = shifted = ""
        if getattr(m, "labels_from_inputs", False):
            padded = self.new_bytes("labels.padded", self.training.batch_size * (self.seq + 1) * 8, "temporary")
            shifted = self.new("loss.shifted_labels", t, "int64")
        if not src:  # autocast's cast of the 16-bit logits
            src = self.new("logits.fp32", m.vocab_size * t, "fp32")
            self.node(src, [logits])
            inner_cast = True
        else:
            inner_cast = False
        loss_kind: Kind = "fp32" if upcast or self.autocast else "act"
        logp = self.new("loss.log_probs", m.vocab_size * t, loss_kind)
        self.node(logp, [src], saves=(logp,))
        loss = self.new("loss", 1, loss_kind, role="temporary")
        tw = self.new("loss.total_weight", 1, loss_kind)
        self.node(loss, [logp], saves=(logp, tw, *([shifted] if shifted else [])))
        if inner_cast:  # autocast's copy lives until cross_entropy returns (measured, as under TP)
            self.dead(src)
        if shifted:
            self.dead(padded, shifted)
        if src != logits and not inner_cast:
            self.dead(src)
        return loss, logp, tw

    def after_loss(self, loss: str) -> None:
        """What the model adds to ``loss`` before its forward returns (the MoE family's load-balancing loss)."""

    def backward(self) -> None:
        self.phase = "backward"
        loss_kind: Kind = "fp32" if self.autocast or getattr(self.model, "loss_upcast", False) else "act"
        grad_loss = self.new("grad.loss", 1, loss_kind, role="temporary")
        buffers: dict[str, str] = {"loss": grad_loss}
        refs: dict[str, int] = {grad_loss: 2}  # backward() keeps its own reference until the end
        count = 0
        self.mark("pre_backward", "root")
        pending_post: list[str] = []  # blocks whose backward is over once the node making their input runs

        tensors, new_bytes, free, grad_size = self.tensors, self.new_bytes, self._free, self.grad_size

        def release(storage: str) -> None:
            refs[storage] -= 1
            if refs[storage] == 0:
                free(tensors[storage])

        recomputed: set[int] = set()
        deferred: dict[str, list[Callable[[], None]]] = {}  # an input cast -> the weights' casts back after it
        for node in reversed(self.nodes):
            if node.out in self.unit_outputs:  # the node that made a block's output: its hooks first
                for unit in pending_post:
                    self.mark("post_backward", unit)
                pending_post = [self.unit_outputs[node.out]]
                self.mark("pre_backward", pending_post[0])
            elif pending_post and node.out == self.first_block_input:
                for unit in pending_post:
                    self.mark("post_backward", unit)
                pending_post = []
            marker = node.out.startswith("ckpt")
            if node.block >= 0 and node.block not in recomputed and node.saves and not marker:
                recomputed.add(node.block)
                self._recompute(node.block)
            incoming = buffers.pop(node.out, None)
            later: list[Callable[[], None]] = []
            casts_back: list[Callable[[], None]] = deferred.setdefault(node.then, []) if node.then else later
            scratch = new_bytes(f"scratch#{id(node)}", node.scratch, "temporary") if node.scratch else ""
            for name, passthrough in node.inputs:
                if name.startswith("param"):
                    kind, _, pname = name.partition(":")
                    self._param_grad(pname, kind == "param16", casts_back, lookup=kind == "paramlookup")
                    continue
                # the engine casts a gradient to its input's dtype (``validate_outputs``, autograd/engine.cpp):
                # under autocast a 16-bit branch of an fp32 add (TP's row-parallel output) gets its own copy
                if passthrough and incoming is not None and (
                        not self.autocast or tensors[incoming].nbytes == grad_size(name)):
                    key = incoming
                    refs[key] += 1
                    if node.opaque:  # a DTensor's local gradient: referenced by its wrapper too
                        self.opaque.add(key)
                else:
                    count += 1
                    key = new_bytes(f"grad.{name}#{count}", grad_size(name), "temporary")
                    refs[key] = 1
                    if node.opaque:
                        self.opaque.add(key)
                if name in buffers and self.sums_after_node(name):  # out of place, once the node has run
                    later.append(lambda n=name, k=key: self._sum_after_node(n, k, buffers, refs, release))
                elif name in buffers:  # fan-in: accumulate into the buffer that is not shared
                    old = buffers[name]
                    opaque = old in self.opaque or key in self.opaque  # a collective's output: old + new
                    if refs[old] == 1 and not opaque:
                        release(key)
                    elif refs[key] == 1 and not opaque:
                        buffers[name] = key
                        release(old)
                    else:
                        count += 1
                        total = new_bytes(f"grad.{name}#{count}", grad_size(name), "temporary")
                        refs[total] = 1
                        if opaque:
                            self.opaque.add(total)
                        buffers[name] = total
                        release(old)
                        release(key)
                else:
                    buffers[name] = key
            if scratch:
                free(tensors[scratch])
            if incoming is not None:
                release(incoming)
            for s in node.saves:
                tensor = tensors[s]
                tensor.saved_by -= 1
                if tensor.saved_by == 0 and tensor.dead:
                    free(tensor)
            for step in later + deferred.pop(node.out, []):
                step()
        for unit in pending_post:
            self.mark("post_backward", unit)
        for key in list(buffers.values()):
            release(key)
        self.mark("post_backward", "root")
        release(grad_loss)

    def sums_after_node(self, name: str) -> bool:
        """Whether fan-in gradients of ``name`` are summed once the node has run (the MoE family overrides).

        The engine adds a node's output gradients into the next nodes' input buffers after the node
        has returned and released its incoming gradient and saved tensors.
        """
        return False

    def _sum_after_node(self, name: str, key: str, buffers: dict[str, str], refs: dict[str, int],
                        release: Callable[[str], None]) -> None:
        """``InputBuffer::accumulate``: ``old.add_(new)`` when only the buffer holds ``old``, else ``old + new``."""
        old = buffers[name]
        if refs[old] == 1:
            release(key)
            return
        total = self.new_bytes(f"grad.{name}#sum{len(self.records)}", self.grad_size(name), "temporary")
        refs[total] = 1
        buffers[name] = total
        release(old)
        release(key)

    def _param_grad(self, name: str, via_cast: bool, later: list[Callable[[], None]], lookup: bool = False) -> None:
        """A parameter's gradient, as mm/embedding backward computes it and AccumulateGrad keeps it.

        The node allocates the gradient (16-bit when it reaches an autocast weight cast). What
        happens after the node has released its inputs goes to ``later``: the cast back to the
        parameter dtype (ToCopyBackward), and for a tied weight's second gradient the out-of-place
        ``.grad + new`` of AccumulateGrad. ``lookup``: the tensor-parallel embedding's gradient, made
        whole (V, d) by DTensor and kept as a view when it is the first (untied) gradient.
        """
        numel = self.params[name]
        nbytes = numel * self.shape.gradient_bytes
        made = self.grad_numel.get(name, numel) * self.shape.gradient_bytes if lookup else nbytes
        if via_cast:
            g16 = self.new(f"{name}.grad16", numel, "act", role="temporary")
        elif name in self.grads_done:
            g16 = self.new_bytes(f"{name}.grad_extra", made, "temporary")
        elif name == "pos_emb.weight":  # the batch-summed (S, d) gradient, then slice_backward
            rows = self.new("pos_emb.grad_rows", self.seq * self.model.d_model, "stream")
            self.grads_done.add(name)
            self.new_bytes(f"{name}.grad", nbytes, "gradient")
            self._free(self.tensors[rows])
            return
        else:
            self.grads_done.add(name)
            self.new_bytes(f"{name}.grad", made, "gradient")
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
        """The records as events (``events.alloc`` and ``events.free``, made directly: one call per event)."""
        # each Event's fields filled as its own __init__ fills them (one dict), without a call per event: an
        # estimate makes tens of thousands (tests/test_speed_simulate.py checks them equal to Event(...)'s)
        new = object.__new__
        out: list[Event] = []
        append = out.append
        for kind, tensor, phase in self.records:
            event = new(Event)
            fields = event.__dict__
            fields["name"] = tensor.name
            fields["role"] = tensor.role or ("activation" if tensor.ever_saved else "temporary")
            fields["nbytes"] = int(tensor.nbytes) if kind == "alloc" else -int(tensor.nbytes)
            fields["phase"] = phase
            append(event)
        return out


def step_events_with_marks(
    model: TransformerConfig, training: TrainingConfig, shape: StepShape, tp: TensorParallel | None = None
) -> tuple[list[Event], list[tuple[int, str, str]]]:
    """The events of :func:`step_events` and where FSDP2's per-block hooks run among them
    (``tp``: one tensor-parallel rank's, docs/tp.md)."""
    sim = _Sim(model, training, shape, tp)
    sim.forward()
    sim.backward()
    return sim.events(), sim.marks


def step_events(model: TransformerConfig, training: TrainingConfig, shape: StepShape) -> list[Event]:
    """Forward, loss and backward events of one step (see the simulation notes above)."""
    sim = _Sim(model, training, shape)
    sim.forward()
    sim.backward()
    return sim.events()
