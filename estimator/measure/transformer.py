"""A readable nanoGPT-style torch implementation of :class:`TransformerConfig`.

It exists so the analytic transformer family can be checked against a real step: parameter
names and shapes equal ``parameter_tensors(cfg)``, and the tensors it saves for backward are the
ones ``saved_tensors(cfg, training)`` lists (docs/transformer.md). Choices that matter for that:

* q, k and v are separate projections (as in HF Llama), so each saved head tensor is its own
  storage whether or not RoPE replaces q and k;
* RoPE tables (cos, sin) are computed once per forward, not kept as buffers: the model's only
  state is its parameters;
* RMSNorm is written out (HF Llama's: upcast to fp32, normalise, cast back, times weight), so the
  saved tensors do not depend on whether the device has a fused kernel;
* the eager causal mask is an additive 0/-inf matrix (``add`` saves nothing), and GQA in eager
  mode broadcasts k/v with expand+reshape (no saved index tensor);
* ``cross_entropy`` on the flattened logits returns the mean loss; with ``loss_upcast`` /
  ``labels_from_inputs`` the loss is transformers' ``ForCausalLMLoss`` (:func:`causal_lm_loss`);
* dropout (``embd_dropout``, ``resid_dropout``, ``attn_dropout``; 0 by default, then no call at all) where
  transformers' GPT-2 applies it: ``F.dropout`` after the embeddings and after both output projections, and
  ``dropout_p`` (with ``scale``) to SDPA, which on the CPU runs torch's math attention (docs/transformer.md).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from estimator.families.transformer import TransformerConfig


class RMSNorm(nn.Module):
    """``weight · x / sqrt(mean(x²) + ε)`` computed in fp32 and cast back (HF LlamaRMSNorm)."""

    def __init__(
        self, dim: int, eps: float, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x32 * rstd).to(dtype)


def make_norm(
    cfg: TransformerConfig, device: torch.device | str | None, dtype: torch.dtype | None
) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.norm_has_bias, device=device, dtype=dtype)


def rope_tables(
    cfg: TransformerConfig, seq_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (S, r), in HF's "rotate half" layout (frequencies repeated for both halves)."""
    r = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, device=device, dtype=torch.float32) / r))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first r dims of each head of x (B, S, heads, h); the rest pass through (NeoX).

    Applied before the heads are transposed, so the result is laid out (B, S, heads, h) with or
    without partial rotation; SDPA's output follows q's layout, so o_proj's input is a view of it.
    """
    r = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (S, 1, r): broadcast over heads
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    if r == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x_pass), dim=-1)


def apply_rope_concat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Phi-3 and GPT-NeoX apply it (``apply_rotary_pos_emb`` in
    transformers/models/phi3/modeling_phi3.py and gpt_neox/modeling_gpt_neox.py, 5.24): on x laid out
    (B, heads, S, h), the first r dims rotated and ``torch.cat`` with the rest, even when the rest is empty.

    The cat makes a contiguous (B, heads, S, h) tensor, so SDPA's output is laid out that way too and the
    output projection's ``transpose(1, 2).reshape`` copies it (:func:`apply_rope` keeps (B, S, heads, h)).
    """
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin  # cos, sin (S, r) broadcast over B and heads
    return torch.cat((rotated, x_pass), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, h) -> (B, K·n_rep, S, h), each kv head shared by n_rep query heads (HF's repeat_kv)."""
    if n_rep == 1:
        return x
    b, k, s, h = x.shape
    return x[:, :, None].expand(b, k, n_rep, s, h).reshape(b, k * n_rep, s, h)


class Attention(nn.Module):
    def __init__(
        self, cfg: TransformerConfig, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        d, h, hq, hk = cfg.d_model, cfg.head_size, cfg.num_heads, cfg.kv_heads
        kw = {"device": device, "dtype": dtype}
        if cfg.fused_qkv:  # transformers' Phi-3 qkv_proj (GPT-NeoX's query_key_value holds the same)
            self.qkv_proj = nn.Linear(d, (hq + 2 * hk) * h, bias=cfg.qkv_has_bias, **kw)
        else:
            self.q_proj = nn.Linear(d, hq * h, bias=cfg.qkv_has_bias, **kw)
            self.k_proj = nn.Linear(d, hk * h, bias=cfg.qkv_has_bias, **kw)
            self.v_proj = nn.Linear(d, hk * h, bias=cfg.qkv_has_bias, **kw)
        self.fused = cfg.fused_qkv
        self.o_proj = nn.Linear(hq * h, d, bias=cfg.linear_bias, **kw)
        self.num_heads, self.kv_heads, self.head_size = hq, hk, h
        self.eager = cfg.attention == "eager"
        self.rope_concat = cfg.rope_concat
        self.attn_dropout, self.resid_dropout = cfg.attn_dropout, cfg.resid_dropout
        self.cache: list[torch.Tensor] | None = None  # transformers' DynamicCache of this forward (kv_cache)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        hq, hk, h = self.num_heads, self.kv_heads, self.head_size
        if self.fused:  # Phi3Attention.forward: slices of one projection's output
            qkv = self.qkv_proj(x)
            q = qkv[..., : hq * h].view(b, s, hq, h)
            k = qkv[..., hq * h : (hq + hk) * h].view(b, s, hk, h)
            v = qkv[..., (hq + hk) * h :].view(b, s, hk, h).transpose(1, 2)
        else:
            q = self.q_proj(x).view(b, s, hq, h)
            k = self.k_proj(x).view(b, s, hk, h)
            v = self.v_proj(x).view(b, s, hk, h).transpose(1, 2)
        if self.rope_concat and cos is not None and sin is not None:  # transformers' Phi-3 / GPT-NeoX order
            q, k = apply_rope_concat(q.transpose(1, 2), cos, sin), apply_rope_concat(k.transpose(1, 2), cos, sin)
        else:
            if cos is not None and sin is not None:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, S, h) views
        if self.cache is not None:  # DynamicLayer.update (transformers/cache_utils.py): cat onto an empty tensor
            k = torch.cat([torch.tensor([], dtype=k.dtype, device=k.device), k], dim=-2)
            v = torch.cat([torch.tensor([], dtype=v.dtype, device=v.device), v], dim=-2)
            self.cache += [k, v]
        if self.eager:
            k, v = repeat_kv(k, hq // hk), repeat_kv(v, hq // hk)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(h))
            mask = torch.full((s, s), float("-inf"), device=x.device, dtype=att.dtype).triu(1)
            att = F.softmax(att + mask, dim=-1)
            att = dropout(att, self.attn_dropout, self.training)  # transformers' eager_attention_forward
            y = att @ v
        elif self.attn_dropout and self.training:  # transformers' sdpa_attention_forward: dropout_p (CPU: math)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout, is_causal=True,
                                               scale=1.0 / math.sqrt(h), enable_gqa=hk != hq)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hk != hq)
        out = self.o_proj(y.transpose(1, 2).reshape(b, s, hq * h))
        return dropout(out, self.resid_dropout, self.training)  # GPT2Attention.resid_dropout


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``nn.Dropout(p)`` as transformers' GPT-2 applies it; no op at all when ``p`` is 0 (the model without dropout).

    In training ``aten::dropout`` on the CPU runs ``_dropout_impl`` (torch aten/src/ATen/native/Dropout.cpp): a
    noise tensor ``empty_like(x).bernoulli_(1 - p).div_(1 - p)`` in x's dtype, then ``x * noise``, which saves the
    noise for backward; on CUDA ``is_fused_kernel_acceptable`` picks the fused ``native_dropout`` (output and a
    bool mask). The bytes do not depend on the mask's values.
    """
    return F.dropout(x, p, training) if p else x


def gelu_new(input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (transformers' own argument name)
    """transformers' ``NewGELUActivation.forward`` (transformers/activations.py, 5.24), the same expression: the
    tanh approximation of GELU (OpenAI GPT-2's), written in Python so each elementwise op saves its tensors."""
    return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class MLP(nn.Module):
    def __init__(
        self, cfg: TransformerConfig, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.swiglu = cfg.mlp == "swiglu"
        self.act = gelu_new if cfg.mlp == "gelu_new" else F.gelu
        self.fused = cfg.fused_gate_up
        if self.fused:  # transformers' Phi-3 gate_up_proj
            self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=cfg.linear_bias, **kw)
        else:
            if self.swiglu:
                self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.linear_bias, **kw)
            self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.linear_bias, **kw)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.linear_bias, **kw)
        self.resid_dropout = cfg.resid_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self._forward(x), self.resid_dropout, self.training)  # GPT2MLP.dropout

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # Phi3MLP.forward, with slices for its chunk(2)
            gate_up = self.gate_up_proj(x)
            f = gate_up.shape[-1] // 2
            gate, up = gate_up[..., :f], gate_up[..., f:]
            return self.down_proj(up * F.silu(gate))
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(
        self, cfg: TransformerConfig, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg, device, dtype)
        self.attn = Attention(cfg, device, dtype)
        self.norm2 = make_norm(cfg, device, dtype)
        self.mlp = MLP(cfg, device, dtype)
        self.parallel = cfg.parallel_residual

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.parallel:
            return x + self.attn(self.norm1(x), cos, sin) + self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Token ids (B, S) -> logits (B, S, V), or the mean cross-entropy when targets are given."""

    def __init__(
        self,
        cfg: TransformerConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        activation_checkpointing: str = "none",
    ) -> None:
        super().__init__()
        if activation_checkpointing not in ("none", "full"):
            raise ValueError(
                f"activation_checkpointing must be 'none' or 'full', got {activation_checkpointing!r}"
            )
        self.cfg = cfg
        self.checkpointing = activation_checkpointing == "full"
        kw = {"device": device, "dtype": dtype}
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, **kw)
        self.pos_emb = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model, **kw) if cfg.positions == "learned" else None
        )
        if cfg.rope_buffers:  # transformers' rotary embedding: inv_freq and its copy original_inv_freq
            r = cfg.rotary_dim
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
            self.register_buffer("inv_freq", inv_freq.to(device=device, dtype=dtype), persistent=False)
            self.register_buffer("original_inv_freq", self.inv_freq.clone(), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg, device, dtype) for _ in range(cfg.num_layers)])
        self.norm_f = make_norm(cfg, device, dtype)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, **kw)
        )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        b, s = idx.shape
        if s > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:s]  # a view of the parameter: the add saves nothing
        x = dropout(x, self.cfg.embd_dropout, self.training)  # GPT2Model.drop
        cos = sin = None
        if self.cfg.positions == "rope":
            dtype = (
                torch.get_autocast_dtype(x.device.type)
                if torch.is_autocast_enabled(x.device.type) and not self.cfg.rope_stream_dtype
                else x.dtype
            )
            plain = self.cfg.rope_stream_dtype  # transformers' rotary embedding runs with autocast disabled
            with torch.autocast(x.device.type, enabled=False) if plain else contextlib.nullcontext():
                cos, sin = rope_tables(self.cfg, s, x.device, dtype)
        cache: list[torch.Tensor] | None = [] if self.cfg.kv_cache and not self.checkpointing else None
        for block in self.blocks:
            block.attn.cache = cache
        for block in self.blocks:
            if self.checkpointing:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        x = self.norm_f(x)
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:
            logits = F.linear(x, self.tok_emb.weight)
        for block in self.blocks:  # the cache lives in `cache` until this forward returns (transformers' output)
            block.attn.cache = None
        if targets is None:
            return logits
        if self.cfg.loss_upcast or self.cfg.labels_from_inputs:
            return causal_lm_loss(logits, targets, self.cfg.vocab_size, self.cfg.loss_upcast,
                                  self.cfg.labels_from_inputs)
        return F.cross_entropy(logits.view(b * s, -1), targets.view(b * s))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, upcast: bool,
                   shift: bool) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (transformers/loss/loss_utils.py, 5.24), statement by statement.

    ``upcast``: ``logits.float()`` first (fp32 log-probabilities and loss in 16-bit precisions). ``shift``:
    ``labels`` are the input ids; they are padded with -100 at the end and shifted by one
    (``labels[..., 1:].contiguous()``), so token i predicts token i+1 and the last position is ignored.
    Without ``shift`` the targets are used as given (already aligned).
    """
    if upcast:
        logits = logits.float()
    if shift:
        labels = F.pad(labels, (0, 1), value=-100)
        shift_labels = labels[..., 1:].contiguous()
    else:
        shift_labels = labels
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1)
    return F.cross_entropy(logits, shift_labels, ignore_index=-100, reduction="mean")


def build_transformer(
    cfg: TransformerConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: str = "none",
) -> Transformer:
    """The model of ``cfg`` created directly on ``device`` in ``dtype`` (small init, GPT-2 style)."""
    model = Transformer(cfg, device=device, dtype=dtype, activation_checkpointing=activation_checkpointing)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model


def measure_saved_bytes(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                        autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict[int, tuple]]:
    """Run forward and collect what autograd saves for backward, one entry per storage.

    Storages of parameters, of the inputs, and (under autocast) of the 16-bit weight casts are
    left out: they are not activations. Returns the loss and ``{storage ptr: (shape, dtype, nbytes)}``.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    excluded |= {idx.untyped_storage().data_ptr(), targets.untyped_storage().data_ptr()}
    params = set(excluded)

    class _WeightCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            out = func(*args, **(kwargs or {}))
            src = args[0] if args else None
            if (func is torch.ops.aten._to_copy.default and isinstance(src, torch.Tensor)
                    and src.untyped_storage().data_ptr() in params):
                excluded.add(out.untyped_storage().data_ptr())
            return out

    seen: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen[ptr] = (tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return t

    device = idx.device.type
    with contextlib.ExitStack() as stack:
        if autocast_dtype is not None:
            stack.enter_context(torch.autocast(device, dtype=autocast_dtype))
            stack.enter_context(_WeightCasts())
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        loss = model(idx, targets)
    return loss, seen
