"""Timeline events of the MoE family: the transformer family's autograd simulation plus routed experts.

:class:`_MoESim` extends ``transformer_events._Sim`` (embedding, RMSNorms, RoPE, attention, loss,
the backward engine) with what ``estimator.measure.moe`` adds, op by op as the live-tensor tracker
sees it (``tests/moe/test_events.py``):

* the router: ``F.linear`` to (T, E) logits, softmax in fp32 (saved), ``topk`` (its int64
  indices saved), the in-place renormalisation ``top_w /= top_w.sum()`` (autograd saves a clone
  of the values and the sum) and the cast back to the logits' dtype; or DeepSeek-V3's sigmoid
  router (fp32 logits, group-limited top-k, ``gather``);
* the routed experts as transformers 5 runs them: ``grouped_mm`` (its default; ``_MoESim._grouped``:
  the T·k pairs sorted by expert, two grouped GEMMs over the whole 3-D weights, whose gradients are
  produced once) or
* the per-expert loop of transformers' eager experts (``MixtralExperts.forward``): the one-hot
  mask (T, k, E+1) int64, then for every expert hit, ``torch.where`` (an (n_e, 2) int64 tensor
  saved by three ops), the gathered tokens (n_e, d), gate/up (n_e, 2F), SiLU and product (n_e, F),
  down (n_e, d), the routing weight (n_e, 1), the weighted output (n_e, d) saved by ``index_add_``;
* in backward, each ``x[token]`` and ``top_w[token, pos]`` gradient is scattered into a zero tensor
  of the full (T, d) / (T, k) size, and each expert's weight gradient into a zero tensor of the
  full 3-D parameter (``select_backward``): the engine sums these out of place, so a layer's
  backward briefly holds three copies of ``gate_up_proj``'s size (the running sum, the new slice's
  zeros, their sum) — the price of the eager path;
* the shared expert (the dense SwiGLU, reused), its sigmoid gate, and the sum;
* with ``aux_loss_coef`` > 0, transformers' ``load_balancing_loss_func`` after the cross-entropy
  (``_MoESim.after_loss``).

MLA and q/k norms are built from the same primitives (linear, RMSNorm, RoPE, SDPA); their slices
and concatenations are modelled as views whose gradients materialise at the size of their base.
With ``deepseek_transformers`` the MLA and router are transformers 5.24's (``_mla_hf``, ``_route_hf``):
``torch.split`` as one node per split (``_split``), interleaved RoPE, the cached latents, the keys'
``new_empty`` + ``copy_``, and SDPA's math kernel decomposed (``_math_sdpa``), as measured op by op
against our module, whose step equals ``DeepseekV3ForCausalLM``'s (docs/moe.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from estimator.config import TrainingConfig
from estimator.errors import EstimatorError
from estimator.events import Event
from estimator.families.base import StepShape
from estimator.families.moe import MoEConfig, expert_tokens, parameter_tensors
from estimator.families.transformer import Kind, kind_bytes
from estimator.families.transformer_events import _T, PASS, _Node, _Sim

I64, BOOL = 8, 1  # bytes of torch.int64 and torch.bool


class _MoESim(_Sim):
    """The transformer simulation with MoE blocks, MLA and q/k norms (see the module docstring)."""

    def __init__(self, moe: MoEConfig, training: TrainingConfig, shape: StepShape) -> None:
        super().__init__(moe.dense_view(), training, shape)
        self.moe = moe
        self.params = {p.name: p.numel for p in parameter_tensors(moe)}
        self.routes = dict(zip(moe.moe_layers, expert_tokens(moe, training), strict=True))
        self.expert_left: dict[str, int] = {}  # 3-D expert parameter -> select_backward grads still to come
        self.expert_sum: dict[str, str] = {}  # 3-D expert parameter -> its running gradient sum
        self.serial = 0
        self.view_base: dict[str, str] = {}
        self.no_stop = False
        self.aux_logits: list[tuple[str, str]] = []  # (MoE block prefix, its router logits), for the aux loss
        self.split_nodes: dict[str, _Node] = {}  # a split's pseudo-tensor -> its node (scratch: see _split)

    def sums_after_node(self, name: str) -> bool:
        """Fan-in gradients of an MoE block's tensors are summed out of place after the node (torch's engine)."""
        return ".moe." in name or name.endswith("norm2.out")

    # --- helpers -------------------------------------------------------------------------
    def _tmp(self, name: str, nbytes: int) -> str:
        """A short-lived tensor allocated now (freed by the caller with ``dead``)."""
        self.serial += 1
        return self.new_bytes(f"{name}#{self.serial}", nbytes, "temporary")

    def _view(self, name: str, nbytes: int, base: str | None = None) -> str:
        """A view: no allocation; its gradient (``nbytes``) is allocated where it is consumed.

        With ``base``, a node is recorded whose backward materialises the base's gradient (slice,
        select and narrow backward allocate a zero tensor of the base's size).
        """
        self.serial += 1
        key = f"{name}@{self.serial}"
        self.tensors[key] = _T(key, nbytes, dead=True, live=False)
        if base is not None:
            self.node(key, [base])
        return key

    def linear(self, prefix: str, x: str, n_in: int, n_out: int, weight: str, bias: str | None,
               stop: bool = False, **kwargs: str) -> str:
        return super().linear(prefix, x, n_in, n_out, weight, bias, stop=stop and not self.no_stop, **kwargs)

    @contextmanager
    def _width(self, d: int, rows: int) -> Iterator[None]:
        """Run a transformer primitive (RMSNorm) on a (rows, d) tensor instead of (T, d_model).

        The transformer simulation's norms take their rows from ``tl`` (T, or T/t of each sequence under
        sequence parallelism) when it has one, else from ``t``: both are set."""
        model, t, tl = self.model, self.t, getattr(self, "tl", None)
        self.model, self.t = model.model_copy(update={"d_model": d}), rows
        if tl is not None:
            self.tl = rows
        try:
            yield
        finally:
            self.model, self.t = model, t
            if tl is not None:
                self.tl = tl

    def norm_of(self, prefix: str, x: str, d: int, rows: int) -> str:
        with self._width(d, rows):
            return self.norm(prefix, x)

    def norm16(self, prefix: str, x: str, d: int, rows: int) -> str:
        """transformers' RMSNorm of a 16-bit tensor under autocast (fp32 weights): ``x.to(float32)``, the fp32
        statistics, ``.to(input_dtype)`` of the normalised tensor, then ``weight *`` it, which promotes to fp32
        (saving the 16-bit tensor). (``norm`` assumes the fp32 stream under autocast.)"""
        if not (self.autocast and self._bytes(x) == 2):
            return self.norm_of(prefix, x, d, rows)
        n = d * rows
        x32 = self.new(f"{prefix}.x_fp32", n, "fp32")
        self.node(x32, [x])
        sq = self.new(f"{prefix}.sq", n, "fp32")
        self.node(sq, [x32], saves=(x32,), scratch=2 * n * 4)
        ms = self.new(f"{prefix}.ms", rows, "fp32")
        self.node(ms, [sq])
        self.dead(sq)
        mse = self.new(f"{prefix}.ms_eps", rows, "fp32")
        self.node(mse, [(ms, PASS)])
        self.dead(ms)
        rstd = self.new(f"{prefix}.rstd", rows, "fp32")
        self.node(rstd, [mse], saves=(rstd,))
        self.dead(mse)
        n32 = self.new(f"{prefix}.n32", n, "fp32")
        self.node(n32, [x32, rstd], saves=(x32, rstd), scratch=n * 4)
        normed = self.new(f"{prefix}.normed", n, "act")
        self.node(normed, [n32])
        self.dead(n32)
        out = self.new(f"{prefix}.out", n, "stream")
        self.node(out, [f"param:{prefix}.weight", normed], saves=(normed,), scratch=n * 4)
        self.dead(normed, rstd, x32)
        return out

    def _kind(self, name: str) -> str:
        return self.tensors[name].kind

    # --- attention -----------------------------------------------------------------------
    def attention(self, p: str, x: str) -> str:
        if self.moe.attention_type == "mla":
            return self._mla_hf(p, x) if self.moe.deepseek_transformers else self._mla(p, x)
        if self.moe.qk_norm == "none":
            return super().attention(p, x)
        return self._qk_norm_attention(p, x)

    def _qk_norm_attention(self, p: str, x: str) -> str:
        """Qwen3-MoE / OLMoE: RMSNorm of q and k (per head or over all heads), then RoPE and SDPA."""
        m, t = self.moe, self.t
        d, h, hq, hk = m.d_model, m.head_size, m.num_heads, m.kv_heads
        bias = m.qkv_bias
        q = self.linear(f"{p}.attn.q_proj", x, d, hq * h, f"{p}.attn.q_proj.weight",
                        f"{p}.attn.q_proj.bias" if bias else None)
        k = self.linear(f"{p}.attn.k_proj", x, d, hk * h, f"{p}.attn.k_proj.weight",
                        f"{p}.attn.k_proj.bias" if bias else None)
        per_head = m.qk_norm == "head"
        qn = self.norm_of(f"{p}.attn.q_norm", q, h if per_head else hq * h, t * hq if per_head else t)
        self.dead(q)
        kn = self.norm_of(f"{p}.attn.k_norm", k, h if per_head else hk * h, t * hk if per_head else t)
        self.dead(k)
        v = self.linear(f"{p}.attn.v_proj", x, d, hk * h, f"{p}.attn.v_proj.weight",
                        f"{p}.attn.v_proj.bias" if bias else None)
        q = self.rope(f"{p}.attn.q", qn, hq)
        self.dead(qn)
        k = self.rope(f"{p}.attn.k", kn, hk)
        self.dead(kn)
        cached = self.kv_cached
        if cached:  # transformers' DynamicCache (kv_cache)
            k, v = self.kv_copies(p, k, v, hk * h)
        y = self.sdpa(p, q, k, v, hq * h)
        out = self.linear(f"{p}.attn.o_proj", y, hq * h, d, f"{p}.attn.o_proj.weight", None)
        self.dead(y, q, *([] if cached else [k, v]))
        return out

    def _split(self, name: str, base: str, parts: list[tuple[str, int]]) -> tuple[list[str], str]:
        """``torch.split`` of ``base`` into views (their byte sizes): the views and a pseudo-tensor for the split node.

        ``SplitWithSizesBackward`` runs once every part's gradient has arrived and concatenates them into one
        gradient of the base's size. Simulated: each part passes its gradient to the split's node (the engine
        sums them in place, so the last part's is released early), whose backward allocates the base's gradient
        with the released part's bytes as scratch (they are alive in the real step while the cat allocates).
        Returns the part views; the caller creates each part's node with :meth:`_part` where it is consumed
        (the parts' nodes run in reverse order of creation).
        """
        split = self._view(name, self.tensors[base].nbytes, base)
        if not self.recomputing:
            self.split_nodes[split] = self.nodes[-1]
        return [self._view(f"{name}.{part}", nbytes) for part, nbytes in parts], split

    def _part(self, view: str, split: str) -> str:
        """The node of one part of a split (created where the part is first used). The part created first runs
        last in backward: its gradient is the one released early, the split node's scratch."""
        self.node(view, [(split, PASS)])
        node = self.split_nodes.get(split)
        if node is not None and not node.scratch:
            node.scratch = self.tensors[view].nbytes
        return view

    def node(self, out: str, inputs: list[str | tuple[str, str]], saves: tuple[str, ...] = (),
             scratch: int = 0) -> None:
        """A node; saving a view (``view_base``) keeps the view's base storage alive."""
        view_base = self.view_base
        super().node(out, inputs, tuple([view_base.get(s, s) for s in saves]) if saves and view_base else saves,
                     scratch)

    def _rope_interleave(self, prefix: str, xs: list[tuple[str, int]]) -> list[str]:
        """transformers' ``apply_rotary_pos_emb_interleave``: for each (tensor, heads), the even and odd slices
        (views; their backward makes a zero gradient of the whole tensor each), x1·cos − x2·sin and
        x2·cos + x1·sin (the products in RoPE's dtype, each saving the table it multiplies by), and their ``cat``.
        All slices are taken first (q's and k's), then q's products, then k's (the order of the function)."""
        r = self.moe.qk_rope_head_dim
        kind: Kind = self.rope_kind
        slices = []
        for x, heads in xs:
            half = heads * (r // 2) * self.t * self._bytes(x)
            slices.append((self._view(f"{x}.even", half, x), self._view(f"{x}.odd", half, x), heads))
        out = []
        for (x1, x2, heads), (x, _) in zip(slices, xs, strict=True):
            n = heads * (r // 2) * self.t
            promoted = kind_bytes(kind, self.shape) != self._bytes(x)
            grad_cast = n * kind_bytes(kind, self.shape) if promoted else 0

            def prod(name: str, src: str, table: str, x: str = x, n: int = n, grad_cast: int = grad_cast) -> str:
                t = self.new(f"{x}.{name}", n, kind)
                self.node(t, [src], saves=(table,), scratch=grad_cast)
                return t

            a, b = prod("x1cos", x1, "rope.cos"), prod("x2sin", x2, "rope.sin")
            c = self.new(f"{x}.rot1", n, kind)
            self.node(c, [(a, PASS), b])
            self.dead(a, b)
            d, e = prod("x2cos", x2, "rope.cos"), prod("x1sin", x1, "rope.sin")
            f = self.new(f"{x}.rot2", n, kind)
            self.node(f, [(d, PASS), (e, PASS)])
            self.dead(d, e)
            g = self.new(f"{x}.roped", 2 * n, kind)
            self.node(g, [(c, PASS), (f, PASS)])
            self.dead(c, f)
            out.append(g)
        return out

    def _math_sdpa(self, a: str, q: str, k: str, v: str) -> str:
        """``F.scaled_dot_product_attention`` with unequal q/k and v head sizes on the CPU: no fused kernel takes
        them, so ``_scaled_dot_product_attention_math`` runs, decomposed (what a dispatch mode sees, measured op by
        op): under autocast the fp32 inputs cast to 16 bits first; 16-bit inputs copied to fp32 (the CPU computes
        it in fp32; the copies live until it returns); q·√scale (saved); the causal mask (``ones`` (S, S) bool,
        ``tril``, ``where``: an fp32 (S, S) tensor, alive until it returns); kᵀ·√scale (saved); the (B, H, S, S)
        scores by ``bmm``; ``+ mask`` out of place; ``_safe_softmax`` (saved); in 16 bits the attention weights
        cast back (returned, dropped); v reshaped for ``bmm`` (fp32: a copy, v being a strided view of
        ``kv_b_proj``'s output; in 16 bits its fp32 copy; saved); ``bmm`` (then, in 16 bits, cast back)."""
        m, t, seq = self.moe, self.t, self.seq
        hq, qk, vd = m.num_heads, m.head_size, m.v_head_dim
        casts, wide = [], []
        ins = []
        for name in (q, k, v):
            src = name
            if self.autocast and self._bytes(name) == 4:  # autocast's cast to 16 bits
                src = self.new(f"{name}.16bit", self.tensors[name].nbytes // 4, "act")
                self.node(src, [name])
                casts.append(src)
            ins.append(src)
        low = self._bytes(ins[0]) == 2
        if low:  # query_acc = query.to(float) ...: copies the CPU computes on
            for j, name in enumerate(ins):
                up = self.new(f"{name}.fp32", self.tensors[name].nbytes // 2, "fp32")
                self.node(up, [name])
                wide.append(up)
                ins[j] = up
        q32, k32, v32 = ins
        kind = self.tensors[q32].kind
        qs = self.new(f"{a}.q_scaled", hq * qk * t, kind)
        self.node(qs, [q32])
        ones = self.new_bytes(f"{a}.mask_ones", seq * seq * BOOL)
        tril = self.new_bytes(f"{a}.mask_tril", seq * seq * BOOL)
        self.dead(ones)
        scalars = [self._tmp(f"{a}.mask_scalar", 4), self._tmp(f"{a}.mask_scalar", 4)]
        mask = self.new(f"{a}.mask", seq * seq, kind)
        self.dead(*scalars, tril)
        ks = self.new(f"{a}.k_scaled", hq * qk * t, kind)
        self.node(ks, [k32])
        scores = self.new(f"{a}.scores", hq * seq * t, kind)
        self.node(scores, [ks, qs], saves=(qs, ks))
        self.dead(ks)  # a temporary of the expression (q·√scale is a local: it lives until the return)
        added = self.new(f"{a}.scores_masked", hq * seq * t, kind)
        self.node(added, [(scores, PASS)])
        self.dead(scores)
        probs = self.new(f"{a}.probs", hq * seq * t, kind)
        self.node(probs, [added], saves=(probs,))
        self.dead(added)
        returned = self.new(f"{a}.probs16", hq * seq * t, "act") if low else ""  # attn weights in the input dtype
        vc = self.new(f"{a}.v_bmm", hq * vd * t, kind)  # (the fp32 copy keeps v's strides: copied again)
        self.node(vc, [(v32, PASS)])
        y = self.new(f"{a}.sdpa32" if low else f"{a}.sdpa", hq * vd * t, kind)
        self.node(y, [vc, probs], saves=(probs, vc))
        self.dead(vc)  # matmul's own copy
        if low:
            y16 = self.new(f"{a}.sdpa", hq * vd * t, "act")
            self.node(y16, [y])
            self.dead(y)
            y = y16
        self.dead(probs, mask, qs, *wide, *([returned] if returned else []), *casts)
        return y

    def _mla_linear(self, a: str) -> Callable[[str, str, int, int], str]:
        """A bias-free projection of the attention ``a`` named ``{a}.{name}`` (MLA's projections)."""

        def lin(name: str, src: str, n_in: int, n_out: int) -> str:
            return self.linear(f"{a}.{name}", src, n_in, n_out, f"{a}.{name}.weight", None)

        return lin

    def _mla_query(self, a: str, x: str, norm: Callable[[str, str, int, int], str]) -> str:
        """MLA's query, (T, H·qk): compressed (q_a_proj, its RMSNorm ``norm``, q_b_proj) when ``q_lora_rank``
        is set, else one projection (both forms of MLA run it alike)."""
        m, lin = self.moe, self._mla_linear(a)
        if not m.q_lora_rank:
            return lin("q_proj", x, m.d_model, m.num_heads * m.head_size)
        qa = lin("q_a_proj", x, m.d_model, m.q_lora_rank)
        qn = norm(f"{a}.q_a_norm", qa, m.q_lora_rank, self.t)
        self.dead(qa)
        q = lin("q_b_proj", qn, m.q_lora_rank, m.num_heads * m.head_size)
        self.dead(qn)
        return q

    def _mla_hf(self, p: str, x: str) -> str:
        """DeepSeek's latent attention as transformers 5.24's ``DeepseekV3Attention`` runs it
        (``estimator.measure.moe.MLAttention.hf_forward``, op by op)."""
        m, t = self.moe, self.t
        d, hq, qk, nope, r, vd = m.d_model, m.num_heads, m.head_size, m.qk_nope_head_dim, m.qk_rope_head_dim, \
            m.v_head_dim
        a = f"{p}.attn"
        lin = self._mla_linear(a)
        q = self._mla_query(a, x, self.norm16)
        ab = self._bytes(q)
        # view(b, s, H, qk).transpose(1, 2): ViewBackward reshapes the (B, H, S, qk) gradient, a copy
        q_heads = self._view(f"{a}.q_heads", self.tensors[q].nbytes, q)
        (q_pass, q_rot), q_split = self._split(f"{a}.q_split", q_heads, [("pass", hq * nope * t * ab),
                                                                         ("rot", hq * r * t * ab)])
        ckv = lin("kv_a_proj", x, d, m.kv_lora_rank + r)
        cb = self._bytes(ckv)
        (c, k_rot), kv_split = self._split(f"{a}.kv_a_split", ckv, [("nope", m.kv_lora_rank * t * cb),
                                                                   ("rot", r * t * cb)])
        self.tensors[c].kind = self.tensors[k_rot].kind = self._kind(ckv)
        self.view_base[c] = ckv  # the norm saves its input, a view: the projection's storage stays
        cn = self.norm16(f"{a}.kv_a_norm", self._part(c, kv_split), m.kv_lora_rank, t)
        self.tensors[q_rot].kind = self._kind(q)
        q_r, k_r = self._rope_interleave(a, [(self._part(q_rot, q_split), hq), (self._part(k_rot, kv_split), 1)]) \
            if m.rope_interleave else [self.rope(f"{a}.q", self._part(q_rot, q_split), hq),
                                       self.rope(f"{a}.k", self._part(k_rot, kv_split), 1)]
        if self.kv_cached:  # DynamicLayer.update: torch.cat([empty, x]) of the compressed latents, kept by the cache
            copies = []
            for name, src in (("kv_cache", cn), ("k_rot_cache", k_r)):
                copy = self.new_bytes(f"{a}.{name}", self.tensors[src].nbytes)
                self.tensors[copy].kind = self._kind(src)
                self.node(copy, [(src, PASS)])
                self.dead(src)
                self.cache.append(copy)
                copies.append(copy)
            cn, k_r = copies
        q_pass = self._part(q_pass, q_split)
        promoted = ""
        if self._bytes(q_r) > ab:  # cat promotes the 16-bit part to RoPE's fp32 first (a copy, freed after it)
            promoted = self.new(f"{a}.q_pass_fp32", hq * nope * t, self._kind(q_r))
            self.node(promoted, [q_pass])
        query = self.new(f"{a}.query", hq * qk * t, self._kind(q_r) if self._bytes(q_r) > ab else self._kind(q))
        self.node(query, [(promoted or q_pass, PASS), (q_r, PASS)])
        if promoted:
            self.dead(promoted)
        # expand_kv: kv_b_proj, view(b, s, H, n + v).transpose(1, 2) (its backward a reshape copy), split
        kv = lin("kv_b_proj", cn, m.kv_lora_rank, hq * (nope + vd))
        kb = self._bytes(kv)
        kv_heads = self._view(f"{a}.kv_heads", self.tensors[kv].nbytes, kv)
        (k_nope, v), kv_b_split = self._split(f"{a}.kv_b_split", kv_heads, [("k_nope", hq * nope * t * kb),
                                                                          ("v", hq * vd * t * kb)])
        k_exp = self._view(f"{a}.k_rot_expanded", hq * r * t * self._bytes(k_r))
        self.node(k_exp, [k_r])  # expand: its backward sums the (B, H, S, r) gradient back to one head
        # key_states = new_empty(...); two copy_ into its slices (CopySlices): each backward clones the whole
        # incoming gradient (the second's clone is the first's incoming; the first's is dropped: new_empty has
        # no gradient) and the slice's gradient for the source; the second also zeros its slice of the clone
        key = self.new(f"{a}.key", hq * qk * t, self._kind(kv))
        key1 = self._view(f"{a}.key_nope_copied", self.tensors[key].nbytes)
        self.node(key1, [self._part(k_nope, kv_b_split)], scratch=self.tensors[key].nbytes)
        self.node(key, [key1, k_exp], scratch=hq * r * t * kb)
        y = self._math_sdpa(a, query, key, self._part(v, kv_b_split))
        # sdpa_attention_forward: reshape, transpose(1, 2).contiguous() (a copy), then reshape(b, s, -1)
        yc = self.new(f"{a}.y", hq * vd * t, self._kind(y))
        self.node(yc, [y])  # the bmm output's view backward reshapes the transposed gradient: a copy
        self.dead(y)
        out = lin("o_proj", yc, hq * vd, d)
        # the locals, dropped at return (compressed_kv too: in 16 bits the norm saved an fp32 copy, not its view)
        latents = [] if self.kv_cached else [cn, k_r]  # (the cache holds its copies until forward returns)
        self.dead(yc, q, q_r, ckv, *latents, query, key, kv)
        return out

    def _mla(self, p: str, x: str) -> str:
        """DeepSeek's latent attention as ``estimator.measure.moe.MLAttention`` runs it (v padded for SDPA)."""
        m, t = self.moe, self.t
        d, hq, qk, nope, r, vd = m.d_model, m.num_heads, m.head_size, m.qk_nope_head_dim, m.qk_rope_head_dim, \
            m.v_head_dim
        a = f"{p}.attn"
        lin = self._mla_linear(a)
        q = self._mla_query(a, x, self.norm_of)
        ab = self.shape.activation_bytes
        q_pass = self._view(f"{a}.q_pass", hq * nope * t * ab, q)
        q_rot = self._view(f"{a}.q_rot", hq * r * t * ab, q)
        ckv = lin("kv_a_proj", x, d, m.kv_lora_rank + r)
        c = self._view(f"{a}.c_kv", m.kv_lora_rank * t * ab, ckv)
        self.tensors[c].kind = self._kind(ckv)
        k_rot_in = self._view(f"{a}.k_rot_in", r * t * ab, ckv)
        self.view_base[c] = ckv  # the norm saves its input, a view: the projection's storage stays
        cn = self.norm_of(f"{a}.kv_a_norm", c, m.kv_lora_rank, t)
        kv = lin("kv_b_proj", cn, m.kv_lora_rank, hq * (nope + vd))
        self.dead(cn)
        k_pass = self._view(f"{a}.k_pass", hq * nope * t * ab, kv)
        v_view = self._view(f"{a}.v", hq * vd * t * ab, kv)
        q_r = self.rope(f"{a}.q", q_rot, hq)
        k_r = self.rope(f"{a}.k", k_rot_in, 1)
        k_exp = self._view(f"{a}.k_rot", hq * r * t * ab)  # expand: its gradient is summed back (1/H the size)
        self.node(k_exp, [k_r], scratch=0)
        qc = self.new(f"{a}.q", hq * qk * t, "act")
        self.node(qc, [(q_pass, PASS), (q_r, PASS)])
        kc = self.new(f"{a}.k", hq * qk * t, "act")
        self.node(kc, [(k_pass, PASS), (k_exp, PASS)])
        vp = self.new(f"{a}.v_pad", hq * qk * t, "act")
        self.node(vp, [(v_view, PASS)])
        y = self.new(f"{a}.sdpa", hq * qk * t, "act")
        lse = self.new(f"{a}.lse", hq * t, "fp32")
        self.node(y, [qc, kc, vp], saves=(qc, kc, vp, y, lse))
        self.dead(lse)
        y_view = self._view(f"{a}.y", hq * vd * t * ab, y)
        yc = self.new(f"{a}.y_flat", hq * vd * t, "act")  # transpose + reshape of a slice: a copy
        self.node(yc, [(y_view, PASS)])
        out = lin("o_proj", yc, hq * vd, d)
        self.dead(yc, y, qc, kc, vp, q, q_r, k_r, ckv, kv)
        return out

    # --- the MoE block -------------------------------------------------------------------
    def mlp(self, p: str, x: str) -> str:
        i = int(p.split(".")[1])
        if not self.moe.is_moe_layer(i):
            return super().mlp(p, x)
        return self._moe(p, i, x)

    def _route_hf(self, m: str, h: str) -> tuple[str, str, str, list[str]]:
        """transformers 5.24's ``DeepseekV3TopkRouter.forward`` (``estimator.measure.moe.MoE.hf_route``), op by op.

        ``F.linear(h.float(), weight.float())`` (in 16 bits both fp32 copies, saved by the product; under autocast
        an autocast linear, 16-bit logits); the sigmoid (saves its output); the choice, which no gradient
        reaches: + ``e_score_correction_bias`` (fp32), each group's top two (values dropped, indices kept by the
        top-k node while ``group_scores`` lives), their sum, the groups' top-k, ``zeros_like`` + ``scatter_``, the
        (T, E) mask by ``expand(...).reshape`` (a copy), ``bool``, ``~`` (saved by ``masked_fill``), the masked
        scores, the experts' top-k (values dropped); then ``gather`` (saves the ids), the sum + 1e-20, the in-place
        ``/=`` (autograd saves a clone of the weights and the denominator) and the scaling. The choice's tensors
        die when the function returns."""
        c, t = self.moe, self.t
        e, k, d, g = c.num_experts, c.experts_per_token, c.d_model, c.n_group
        if self.autocast or self._bytes(h) == 4:
            logits = self.linear(f"{m}.router", h, d, e, f"{m}.router.weight", None)
        else:  # both operands copied to fp32; the product saves both copies
            x32 = self.new(f"{m}.router.x_fp32", d * t, "fp32")
            self.node(x32, [h])
            w32 = self.new(f"{m}.router.weight_fp32", e * d, "fp32")
            self.node(w32, [f"param:{m}.router.weight"])
            logits = self.new(f"{m}.router.out", e * t, "fp32")
            self.node(logits, [w32, x32], saves=(x32, w32))
            self.dead(x32, w32)
        lk = self._kind(logits)
        scores = self.new(f"{m}.router.scores", e * t, lk)
        self.node(scores, [logits], saves=(scores,))
        # the choice's top-k and masked_fill nodes keep their indices and mask only while autograd records
        saving = self.ckpt_block < 0 or self.recomputing
        choice = self.new(f"{m}.router.choice", e * t, "fp32")
        g_vals = self.new(f"{m}.router.group_top2", g * 2 * t, "fp32")
        g_idx = self.new_bytes(f"{m}.router.group_top2_ids", g * 2 * t * I64)
        if not saving:
            self.dead(g_idx)
        g_scores = self.new(f"{m}.router.group_scores", g * t, "fp32")
        self.dead(g_vals)
        gi_vals = self.new(f"{m}.router.group_topk", c.topk_group * t, "fp32")
        group_idx = self.new_bytes(f"{m}.router.group_idx", c.topk_group * t * I64)
        self.dead(gi_vals)
        group_mask = self.new(f"{m}.router.group_mask", g * t, "fp32")
        score_mask = self.new(f"{m}.router.score_mask", e * t, "fp32")
        as_bool = self.new_bytes(f"{m}.router.mask_bool", e * t * BOOL)
        inverted = self.new_bytes(f"{m}.router.mask_not", e * t * BOOL)
        self.dead(as_bool)
        masked = self.new(f"{m}.router.choice_masked", e * t, "fp32")
        if not saving:
            self.dead(inverted)
        self.dead(choice)
        top_v = self.new(f"{m}.router.top_v", k * t, "fp32")
        top_i = self.new_bytes(f"{m}.router.top_i", k * t * I64)
        self.tensors[top_i].kind = "i64"
        self.dead(top_v)
        w = self.new(f"{m}.router.top_w", k * t, lk)
        self.node(w, [scores], saves=(top_i,))  # gather backward: zeros(T, E).scatter_add_
        if c.norm_topk_prob:
            s = self.new(f"{m}.router.sum", t, lk)
            self.node(s, [(w, PASS)])
            den = self.new(f"{m}.router.den", t, lk)
            self.node(den, [(s, PASS)])
            self.dead(s)
            clone = self.new(f"{m}.router.top_w_clone", k * t, lk)  # in-place div_ saves the original
            wn = self._view(f"{m}.router.top_w_norm", k * t * kind_bytes(lk, self.shape))
            self.node(wn, [w, den], saves=(clone, den), scratch=3 * k * t * kind_bytes(lk, self.shape))
            self.dead(clone)
            w_in, locals_ = wn, [den]
        else:
            w_in, locals_ = w, []
        ws = self.new(f"{m}.router.top_w_scaled", k * t, lk)
        self.node(ws, [w_in])
        self.dead(w)
        if saving:  # saved by the choice's nodes (masked_fill, the two top-k), which no gradient reaches: they
            for kept in (inverted, g_idx, group_idx):  # die with the locals
                self.tensors[kept].ever_saved = True
        choice_locals = [inverted, masked, g_idx] if saving else [masked]
        self.dead(scores, *choice_locals, g_scores, group_idx, group_mask, score_mask, *locals_)
        return ws, top_i, lk, [logits, ws, top_i]

    def _route(self, m: str, h: str) -> tuple[str, str, str, list[str]]:
        """Router forward: returns (top-k weights, top-k ids, weights' dtype class, locals dropped at return)."""
        c, t = self.moe, self.t
        if c.deepseek_transformers:
            return self._route_hf(m, h)
        e, k, d = c.num_experts, c.experts_per_token, c.d_model
        fp32_in = c.router_fp32 or c.router == "sigmoid"
        src = h
        if fp32_in and self._kind(h) != "fp32" and not self.fp32_stream and not self.autocast:
            src = self.new(f"{m}.router.x_fp32", d * t, "fp32")
            self.node(src, [h])
        logits = self.linear(f"{m}.router", src, d, e, f"{m}.router.weight", None)
        if src != h:
            self.dead(src)
        logits_kind = "fp32" if fp32_in and not self.autocast else self._kind(logits)
        if c.router == "sigmoid":
            scores = self.new(f"{m}.router.scores", e * t, "fp32")
            self.node(scores, [logits], saves=(scores,))
            choice = self.new(f"{m}.router.choice", e * t, "fp32")  # masked_fill of a detached copy
            top_v = self.new(f"{m}.router.top_v", k * t, "fp32")
            top_i = self.new_bytes(f"{m}.router.top_i", k * t * I64)
            self.dead(choice, top_v)
            w = self.new(f"{m}.router.top_w", k * t, "fp32")
            self.node(w, [scores], saves=(top_i,))  # gather backward: zeros(T, E).scatter_add_
            if c.norm_topk_prob:
                s = self.new(f"{m}.router.sum", t, "fp32")
                self.node(s, [w])
                den = self.new(f"{m}.router.den", t, "fp32")
                self.node(den, [(s, PASS)])
                self.dead(s)
                wn = self.new(f"{m}.router.top_w_norm", k * t, "fp32")
                self.node(wn, [w, den], saves=(w, den), scratch=3 * k * t * 4)
                self.dead(w, den)
                w = wn
            ws = self.new(f"{m}.router.top_w_scaled", k * t, "fp32")
            self.node(ws, [w])
            self.dead(w)
            return ws, top_i, "fp32", [logits, scores, ws, top_i]
        src = logits
        if kind_bytes(logits_kind, self.shape) != 4:  # softmax(dtype=float) converts first
            src = self.new(f"{m}.router.logits_fp32", e * t, "fp32")
            self.node(src, [logits])
        probs = self.new(f"{m}.router.probs", e * t, "fp32")
        self.node(probs, [src], saves=(probs,))
        if src != logits:
            self.dead(src)
        top_v = self.new(f"{m}.router.top_v", k * t, "fp32")
        top_i = self.new_bytes(f"{m}.router.top_i", k * t * I64)
        self.tensors[top_i].kind = "i64"
        self.node(top_v, [probs], saves=(top_i,))  # topk backward: zeros(T, E).scatter_
        w = top_v
        if c.norm_topk_prob:
            s = self.new(f"{m}.router.sum", t, "fp32")
            self.node(s, [(top_v, PASS)])
            clone = self.new(f"{m}.router.top_v_clone", k * t, "fp32")  # in-place div_ saves the original
            w = self._view(f"{m}.router.top_w", k * t * 4)
            self.node(w, [top_v, s], saves=(clone, s), scratch=3 * k * t * 4)
            self.dead(clone, s)
        self.dead(probs)  # route()'s local (saved by softmax), dropped when it returns
        keep = [logits, top_v, top_i]
        if kind_bytes(logits_kind, self.shape) != 4:  # .to(logits.dtype)
            cast = self.new(f"{m}.router.top_w16", k * t, logits_kind)
            self.node(cast, [w])
            self.dead(top_v)
            keep = [logits, top_i, cast]
            return cast, top_i, logits_kind, keep
        return w, top_i, "fp32", keep

    # --- the load-balancing loss ------------------------------------------------------------
    def after_loss(self, loss: str) -> None:
        """``loss += α · load_balancing_loss_func(router_logits, E, k)`` (transformers 5.24, no mask).

        Per MoE block, in order: the softmax of its logits in their dtype (saved: its output, (T, E)),
        ``topk`` (values and int64 indices; its node is unreachable from the loss, so it keeps nothing
        and both die when rebound), the indices as fp32 (T·k) for ``histc`` (E), the running counts
        (E, fp32, out of place), an fp32 copy of the probabilities when they are not fp32, their sum
        over tokens (E) and the running probability sum (E). Then the two means (E each; ``f`` is
        saved by the product), the product, its sum, ×E, ×α, and the in-place add into the loss. In
        backward these nodes run first (created last): each block's (T, E) logits gradient waits in
        the engine's buffer until that block's router adds its own. The logits are kept by the
        forward until it returns.
        """
        c, t = self.moe, self.t
        if not c.aux_loss_coef or not self.aux_logits:
            return
        e, k = c.num_experts, c.experts_per_token
        counts = self.new("aux.tokens_per_expert_sum", e, "fp32")  # torch.zeros (no gradient)
        prob_sum = self.new("aux.router_prob_sum", e, "fp32")
        prob_sum_grad = False  # the zeros have no gradient: the first sum is the first input with one
        rebound: dict[str, str] = {}

        def rebind(var: str, tensor: str) -> None:
            if var in rebound:
                self.dead(rebound[var])
            rebound[var] = tensor

        for m, logits in self.aux_logits:
            a = f"{m}.aux"
            probs = self.new(f"{a}.probs", e * t, self._kind(logits))
            self.node(probs, [logits], saves=(probs,))
            rebind("routing_weights", probs)
            values = self.new(f"{a}.top_v", k * t, self._kind(logits))
            chosen = self.new_bytes(f"{a}.top_i", k * t * I64)
            rebind("_", values)
            rebind("selected_experts", chosen)
            as_float = self.new(f"{a}.top_i_fp32", k * t, "fp32")
            hist = self.new(f"{a}.histc", e, "fp32")
            self.dead(as_float)
            new_counts = self.new(f"{a}.tokens_per_expert_sum", e, "fp32")
            self.dead(hist, counts)
            counts = new_counts
            src = probs
            if self._bytes(probs) != 4:  # .float()
                src = self.new(f"{a}.probs_fp32", e * t, "fp32")
                self.node(src, [probs])
            col = self.new(f"{a}.prob_sum", e, "fp32")
            self.node(col, [(src, PASS)])  # sum(dim=0): backward expands the incoming gradient (a view)
            if src != probs:
                self.dead(src)
            new_sum = self.new(f"{a}.router_prob_sum", e, "fp32")
            self.node(new_sum, [(prob_sum, PASS), (col, PASS)] if prob_sum_grad else [(col, PASS)])
            self.dead(col, prob_sum)
            prob_sum, prob_sum_grad = new_sum, True
        f = self.new("aux.tokens_per_expert", e, "fp32")
        p_mean = self.new("aux.router_prob_per_expert", e, "fp32")
        self.node(p_mean, [prob_sum])  # division by a number: backward allocates grad / rows
        prod = self.new("aux.product", e, "fp32")
        self.node(prod, [p_mean], saves=(f,))  # f · P.unsqueeze(0): backward grad · f
        total = self.new("aux.sum", 1, "fp32")
        self.node(total, [(prod, PASS)])
        self.dead(prod)
        aux = self.new("aux.loss", 1, "fp32")
        self.node(aux, [total])  # × E
        # the function returns: its locals die in the order they were bound
        self.dead(counts, prob_sum, *rebound.values(), f, p_mean, total)
        scaled = self.new("aux.scaled", 1, "fp32")
        self.node(scaled, [aux])  # × α
        self.dead(aux)
        # loss += ...: in place, so the step's loss tensor is the one the cross-entropy made
        ce = next(n for n in reversed(self.nodes) if n.out == loss)
        self.tensors["loss.ce"] = _T("loss.ce", self.tensors[loss].nbytes, dead=True, live=False)
        ce.out = "loss.ce"
        self.node(loss, [("loss.ce", PASS), (scaled, PASS)])
        self.dead(scaled, *(logits for _, logits in self.aux_logits))

    def _bytes(self, name: str) -> int:
        """Bytes per element of a tensor's dtype class."""
        return kind_bytes(self.tensors[name].kind, self.shape)

    def _expert_linear(self, prefix: str, x: str, n_in: int, n_out: int, param: str, e: int, rows: int) -> str:
        """``F.linear(x, param[e])``: the select view, autocast's (uncached) casts, the mm (saves x)."""
        wslice = self._view(f"{param}[{e}]", n_in * n_out * self.shape.gradient_bytes)
        self.node(wslice, [f"param:hook|select|{param}"])
        w, saves, casts = wslice, [x], []
        if self.autocast:
            if self._bytes(x) != self.shape.activation_bytes:
                x = self.new(f"{prefix}.x16", n_in * rows, "act")
                self.node(x, [saves[0]])
                casts.append(x)
            w = self.new(f"{param}[{e}].16bit", n_in * n_out, "act")
            self.node(w, [wslice])
            casts.append(w)
            saves = [x, w]
        out = self.new(f"{prefix}.out", n_out * rows, "act")
        self.node(out, [w, x], saves=tuple(saves))
        self.dead(*casts)
        return out

    def _grouped(self, m: str, i: int, h: str, w: str, w_kind: str) -> str:
        """transformers' ``grouped_mm_experts_forward``: returns the (T, d) output, or "" at checkpoint's early stop.

        The T·k pairs sorted by expert (``sort``: the sorted ids and the permutation, int64), the tokens
        gathered once (saves ``perm // k``), the weights gathered (saves ``perm``), ``histc`` counts (fp32,
        from an fp32 copy of the ids) and their int32 ``cumsum`` offsets (saved by both GEMMs); the
        grouped GEMM with the whole ``gate_up_proj`` (in the parameters' dtype: ``grouped_mm`` is not
        autocast, so its input is cast to the weight's dtype and it saves that), SiLU·up, the grouped
        GEMM with ``down_proj``, the routing weight (saves both factors), the inverse permutation
        (``empty_like`` + ``arange``) and the gather back to token order (saves it), the sum over k.
        In backward each GEMM produces its whole weight's gradient once (then the input's gradient).
        Every tensor has one row per (token, expert) pair, T·k whatever the routing (E·C slots under a
        capacity factor, the padded dispatch that assumption describes).
        """
        c = self.moe
        d, f = c.d_model, c.expert_d_ff
        s = sum(self.routes[i])
        pb = self.shape.parameter_bytes
        for field, n in (("d_model", d), ("expert_d_ff", f)):
            if n * pb % 16:  # torch checks this before any grouped GEMM (CPU and CUDA)
                raise EstimatorError(f"model.{field}: experts_implementation grouped_mm needs rows of a multiple of "
                                     f"16 bytes (torch.nn.functional.grouped_mm), got {n} x {pb} B; use a multiple "
                                     f"of {16 // pb} or experts_implementation: eager")
        ids = self.new_bytes(f"{m}.expert_ids_sorted", s * I64)
        perm = self.new_bytes(f"{m}.perm", s * I64)
        tok = self.new_bytes(f"{m}.pair_token", s * I64)  # perm // k
        sel = self.new(f"{m}.selected", d * s, self.tensors[h].kind)
        self.node(sel, [h], saves=(tok,))  # backward: zeros(T, d).index_put_(accumulate)
        self.dead(tok)  # a temporary of the expression
        sw = self.new(f"{m}.pair_weight", s, w_kind)
        self.node(sw, [w], saves=(perm,))  # backward: zeros(T·k).index_put_
        hist = self.new(f"{m}.histc_input", s, "fp32")
        tpe = self.new(f"{m}.tokens_per_expert", c.num_experts, "fp32")
        offs = self.new_bytes(f"{m}.offsets", c.num_experts * 4)  # int32
        src = sel
        if self._bytes(sel) != pb:  # input.to(weight.dtype)
            src = self.new(f"{m}.selected_cast", d * s, "stream")
            self.node(src, [sel])
        gu = self.new(f"{m}.gate_up", 2 * f * s, "stream")
        self.node(gu, [f"param:{m}.experts.gate_up_proj", src], saves=(src, offs))
        if src != sel:
            self.dead(src)
        x = f"{m}.pairs"
        # chunk: gate and up are views; backward concatenates their gradients into one (T·k, 2F) tensor
        gate = self._view(f"{x}.gate", f * s * pb)
        self.node(gate, [gu, f"param:hook|free|{x}.up_grad"])
        act = self.new(f"{x}.silu", f * s, "stream")
        self.node(act, [gate], saves=(gu,))
        hid = self.new(f"{x}.hidden", f * s, "stream")
        self.node(hid, [act, f"param:hook|alloc|{x}.up_grad|{f * s * pb}"], saves=(act, gu))
        self.dead(act, gu)
        down = self.new(f"{m}.down", d * s, "stream")
        self.node(down, [f"param:{m}.experts.down_proj", hid], saves=(hid, offs))
        self.dead(hid)
        prod_kind = w_kind if self._bytes(sw) > self._bytes(down) else "stream"
        weighted = self.new(f"{m}.weighted", d * s, prod_kind)
        grad_sw = d * s * self._bytes(weighted)  # grad·down, summed to (T·k, 1) once the node has returned
        if self.ckpt_block < 0:
            scratch = grad_sw
            if prod_kind != "stream":  # fp32 weights, 16-bit experts (DeepSeek's router in bf16): grad·w is made in
                # fp32 and cast to down's dtype (the engine) while grad·down lives; the fp32 one is freed before
                # the (T·k, 1) sum is allocated (measured)
                scratch = 2 * grad_sw - s * self._bytes(sw)
            self.node(weighted, [down, sw], saves=(down, sw), scratch=scratch)
        else:  # recomputed saved tensors die with the node's locals, before that sum
            wide = self._view(f"{m}.pair_weight_wide", grad_sw, sw)
            # fp32 weights, 16-bit experts: grad·w is made in fp32 before its cast (measured)
            cast = d * s * (self._bytes(weighted) - self._bytes(down)) if prod_kind != "stream" else 0
            self.node(weighted, [down, wide], saves=(down, sw), scratch=cast)
        inv = self.new_bytes(f"{m}.inv_perm", s * I64)
        self.dead(self._tmp(f"{m}.arange", s * I64))
        if self.recomputing and not c.shared_expert_d_ff:
            # checkpoint's early stop: the gather back saves inv_perm, the block's last saved tensor
            self.tensors[inv].saved_by += 1
            self.dead(ids, perm, sel, sw, hist, tpe, offs, down, weighted, inv)
            return ""
        back = self.new(f"{m}.unsorted", d * s, prod_kind)
        self.node(back, [weighted], saves=(inv,))  # backward: zeros(T·k, d).index_put_
        self.dead(weighted)
        total = self.new(f"{m}.out", d * self.t, prod_kind)
        # view(T, k, d).sum(1): backward expands the incoming gradient, and the view's backward reshapes that
        # expanded (stride-0) tensor to (T·k, d): a copy
        self.node(total, [back])
        self.dead(perm, sel, sw, offs, down, inv)  # saved: they stay until backward
        self.dead(ids, hist, tpe, back)  # the function's locals, freed in this order when it returns
        if self._bytes(total) == self._bytes(h):
            return total
        result = self.new(f"{m}.out_cast", d * self.t, self.tensors[h].kind)  # .to(hidden_states.dtype)
        self.node(result, [total])
        self.dead(total)
        return result

    def _moe(self, p: str, i: int, h: str) -> str:
        c = self.moe
        m = f"{p}.moe"
        # Qwen2-MoE (a gated shared expert) runs the shared SwiGLU first, its gate after the routed experts
        first = self._shared_mlp(m, h) if c.shared_expert_d_ff and c.shared_expert_gate else ""
        w, top_i, w_kind, keep = self._route(m, h)
        if c.aux_loss_coef and not self.recomputing:  # collected for the load-balancing loss (output_router_logits)
            self.aux_logits.append((m, keep.pop(0)))
        if c.experts_implementation == "grouped_mm":
            out = self._grouped(m, i, h, w, w_kind)
            if not out:
                self.dead(*keep)
                return ""
            return self._shared(m, h, out, keep, first)
        return self._eager(m, i, h, w, w_kind, keep, first)

    def _eager(self, m: str, i: int, h: str, w: str, w_kind: str, keep: list[str], first: str = "") -> str:
        """transformers' eager ``MixtralExperts.forward``: the loop over the experts hit (module docstring)."""
        c, t = self.moe, self.t
        e_n, k, d, f = c.num_experts, c.experts_per_token, c.d_model, c.expert_d_ff
        out = self.new(f"{m}.out", d * t, self.tensors[h].kind)  # zeros_like(hidden_states)
        self.dead(self._tmp(f"{m}.aminmax", I64), self._tmp(f"{m}.aminmax", I64))  # one_hot's range check
        mask = self.new_bytes(f"{m}.mask", t * k * (e_n + 1) * I64)
        counts = self.new_bytes(f"{m}.counts", (e_n + 1) * I64)
        gt = self.new_bytes(f"{m}.hit_bool", (e_n + 1) * BOOL)
        self.dead(counts)  # greater(mask.sum(...), 0): the sum is a temporary of the expression
        route = self.routes[i]
        hit = [e for e, n in enumerate(route) if n]
        hits = self.new_bytes(f"{m}.hit", len(hit) * I64)
        self.dead(gt)
        for param in (f"{m}.experts.gate_up_proj", f"{m}.experts.down_proj"):
            self.expert_left[param] = len(hit)
        version, ab = "", self.shape.activation_bytes
        prev: dict[str, str] = {}  # the loop's Python variables: a tensor dies when its variable is rebound

        def rebind(var: str, tensor: str) -> None:
            if var in prev:
                self.dead(prev[var])
            prev[var] = tensor

        for j, e in enumerate(hit):
            n, x = route[e], f"{m}.e{e}"
            self.dead(self._tmp(f"{x}.is_sentinel", BOOL))
            nz = self.new_bytes(f"{x}.where", n * 2 * I64)  # torch.where: (pos, token) views of one tensor
            self.tensors[nz].kind = "i64"
            rebind("token", nz)
            cur = self.new(f"{x}.tokens", d * n, self.tensors[h].kind)
            self.node(cur, [h], saves=(nz,))  # backward: zeros(T, d).index_put_ (in place with no dispatch mode)
            rebind("current", cur)
            gu = self._expert_linear(f"{x}.gate_up", cur, d, 2 * f, f"{m}.experts.gate_up_proj", e, n)
            rebind("gate_up", gu)
            # chunk: gate and up are views; backward concatenates their gradients into one (n, 2F) tensor
            gate = self._view(f"{x}.gate", f * n * ab)
            self.node(gate, [gu, f"param:hook|free|{x}.up_grad"])
            act = self.new(f"{x}.silu", f * n, "act")
            self.node(act, [gate], saves=(gu,))
            hid = self.new(f"{x}.hidden", f * n, "act")
            self.node(hid, [act, f"param:hook|alloc|{x}.up_grad|{f * n * ab}"], saves=(act, gu))
            self.dead(act)
            down = self._expert_linear(f"{x}.down", hid, f, d, f"{m}.experts.down_proj", e, n)
            self.dead(hid)
            rebind("hidden", down)
            wsel = self.new(f"{x}.weight", n, w_kind)
            self.node(wsel, [w], saves=(nz,))  # backward: zeros (T, k, 1).index_put_
            prod_kind = w_kind if self._bytes(wsel) > self._bytes(down) else "act"
            weighted = self.new(f"{x}.weighted", d * n, prod_kind)
            grad_w = d * n * self._bytes(weighted)  # grad·down, summed to (n, 1) once the node has returned
            if self.ckpt_block < 0:
                self.node(weighted, [down, wsel], saves=(down, wsel), scratch=grad_w)
            else:  # recomputed saved tensors die with the node's locals, before that sum
                self.node(weighted, [down, self._view(f"{x}.weight_wide", grad_w, wsel)], saves=(down, wsel))
            self.dead(wsel)
            rebind("hidden", weighted)
            src = weighted
            if self._bytes(weighted) != self._bytes(out):  # .to(final_hidden_states.dtype)
                src = self.new(f"{x}.weighted_cast", d * n, self.tensors[out].kind)
                self.node(src, [weighted])
            last = j == len(hit) - 1
            new_version = out if last else self._view(f"{m}.out_v{j}", self.tensors[out].nbytes)
            inputs: list[str | tuple[str, str]] = [(version, PASS), src] if version else [src]
            self.node(new_version, inputs, saves=(nz, src))  # index_add_ saves the index and the source
            if src != weighted:
                self.dead(src)
            version = new_version
            if last and self.recomputing and not c.shared_expert_d_ff:
                # checkpoint's early stop: the block's last saved tensors are packed, the rerun ends
                self.dead(*prev.values(), out, mask, hits, *keep)
                return ""
        self.dead(*prev.values())
        self.dead(mask, hits)
        return self._shared(m, h, out, keep, first)

    def _shared_mlp(self, m: str, h: str) -> str:
        """The shared expert's SwiGLU on every token ("" at checkpoint's early stop at its down_proj)."""
        c = self.moe
        model = self.model
        self.model = model.model_copy(update={"d_ff": c.shared_expert_d_ff})
        self.no_stop = c.shared_expert_gate  # the gate's product, not down_proj, is the last to save
        try:
            return super().mlp(m, h)
        finally:
            self.model, self.no_stop = model, False

    def _shared(self, m: str, h: str, out: str, keep: list[str], shared: str = "") -> str:
        """The shared expert (and its sigmoid gate) added to the routed experts' output ``out``;
        ``shared``: its output when it ran before the router (Qwen2-MoE's order)."""
        c, t, d = self.moe, self.t, self.moe.d_model
        result = out
        if c.shared_expert_d_ff:
            shared = shared or self._shared_mlp(m, h)
            if not shared:  # early stop at the shared expert's down_proj (checkpoint rerun)
                self.dead(out, *keep)
                return ""
            if c.shared_expert_gate:
                g = self.linear(f"{m}.shared_gate", h, d, 1, f"{m}.shared_gate.weight", None)
                sg = self.new(f"{m}.shared_gate.sigmoid", t, self.tensors[g].kind)
                self.node(sg, [g], saves=(sg,))
                self.dead(g)
                if self.recomputing:  # early stop: the product's inputs are the block's last saved tensors,
                    for s in (sg, shared):  # packed before the product is computed
                        self.tensors[s].saved_by += 1
                    self.dead(sg, shared, out, *keep)
                    return ""
                gated = self.new(f"{m}.shared_gated", d * t, self.tensors[shared].kind)
                # backward holds at most two (T, d) tensors (the allocator's record): grad·shared before
                # its sum to (T, 1), and grad·sigmoid; the (T, 1) sum never overlaps both
                self.node(gated, [sg, shared], saves=(sg, shared),
                          scratch=d * t * self._bytes(gated) - t * self._bytes(sg))
                self.dead(sg, shared)
                shared = gated
            result = self.new(f"{m}.sum", d * t, self.tensors[out].kind)
            self.node(result, [(out, PASS), (shared, PASS)])
            self.dead(shared, out)
        self.dead(*keep)
        return result

    def _param_grad(self, name: str, via_cast: bool, later: list[Callable[[], None]], **kwargs: bool) -> None:
        """Expert weights: ``select_backward`` scatters each slice's gradient into zeros of the full
        parameter; the engine sums them out of place; the last sum becomes ``.grad``."""
        if not name.startswith("hook|"):
            super()._param_grad(name, via_cast, later, **kwargs)
            return
        _, what, rest = name.split("|", 2)
        if what == "alloc":  # a gradient the sim keeps outside the engine's buffers (chunk's second half)
            tensor, nbytes_text = rest.split("|")
            self.new_bytes(tensor, int(nbytes_text), "temporary")
            return
        if what == "free":
            later.append(lambda: self._free(self.tensors[rest]))
            return
        param = rest
        nbytes = self.params[param] * self.shape.gradient_bytes
        full = self._tmp(f"{param}.select_backward", nbytes)

        def accumulate() -> None:
            running = self.expert_sum.pop(param, None)
            buf = full
            if running is not None:  # the engine adds in place: the buffer alone holds the running sum
                buf = running
                self._free(self.tensors[full])
            self.expert_left[param] -= 1
            if self.expert_left[param]:
                self.expert_sum[param] = buf
                return
            self._free(self.tensors[buf])
            self.new_bytes(f"{param}.grad", nbytes, "gradient")

        later.append(accumulate)


def step_events(model: MoEConfig, training: TrainingConfig, shape: StepShape) -> list[Event]:
    """Forward, loss and backward events of one step of ``estimator.measure.moe`` (a fresh list)."""
    key = (model.model_dump_json(), training.model_dump_json(), shape)
    if key not in _CACHE:  # one simulation per (model, batch, dtypes): an estimate asks several times
        sim = _MoESim(model, training, shape)
        sim.forward()
        sim.backward()
        if len(_CACHE) >= 16:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = tuple(sim.events())
    return list(_CACHE[key])


_CACHE: dict[tuple[str, str, StepShape], tuple[Event, ...]] = {}
