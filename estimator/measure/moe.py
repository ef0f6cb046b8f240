"""A readable torch implementation of :class:`MoEConfig`, used by ``verify`` and the tests.

Built from the dense transformer's pieces (``estimator.measure.transformer``: RMSNorm, RoPE,
attention, SwiGLU) plus what MoE models add. The routed experts follow transformers'
``experts_implementation="eager"`` (``MixtralExperts.forward`` in transformers 5): the experts are
two 3-D parameters, ``gate_up_proj`` (E, 2F, d) and ``down_proj`` (E, d, F), and forward loops over
the experts hit by at least one token, gathers their tokens, runs the SwiGLU on them with the
expert's slice of the weights, scales by the routing weight and ``index_add_``s the result. The
router is Qwen2-MoE/OLMoE's (softmax in fp32, top-k, optional renormalisation, cast back) or
DeepSeek-V3's (fp32 logits, sigmoid, group-limited top-k, scaling). ``forward`` records the tokens
each expert received in ``tokens_per_expert`` (one list per MoE layer), which ``verify`` reports.
With ``cfg.deepseek_transformers`` the MLA, the router and the parameters' order are transformers 5.24's
``DeepseekV3Attention``, ``DeepseekV3TopkRouter`` and ``DeepseekV3DecoderLayer``'s, statement by statement.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from estimator.families.moe import MoEConfig
from estimator.measure.transformer import MLP, Attention, RMSNorm, apply_rope, rope_tables

Device = torch.device | str | None


class QKNormAttention(Attention):
    """GQA attention with RMSNorms on q and k: per head (Qwen3-MoE) or over all heads (OLMoE)."""

    def __init__(self, cfg: MoEConfig, device: Device, dtype: torch.dtype | None) -> None:
        super().__init__(cfg.dense_view(), device, dtype)
        width = (1, 1) if cfg.qk_norm == "head" else (cfg.num_heads, cfg.kv_heads)
        self.q_norm = RMSNorm(width[0] * self.head_size, cfg.norm_eps, device, dtype)
        self.k_norm = RMSNorm(width[1] * self.head_size, cfg.norm_eps, device, dtype)
        self.per_head = cfg.qk_norm == "head"

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        hq, hk, h = self.num_heads, self.kv_heads, self.head_size
        if self.per_head:
            q = self.q_norm(self.q_proj(x).view(b, s, hq, h))
            k = self.k_norm(self.k_proj(x).view(b, s, hk, h))
        else:
            q = self.q_norm(self.q_proj(x)).view(b, s, hq, h)
            k = self.k_norm(self.k_proj(x)).view(b, s, hk, h)
        v = self.v_proj(x).view(b, s, hk, h).transpose(1, 2)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        if self.cache is not None:  # transformers' DynamicCache (kv_cache; Attention.forward has the same)
            k = torch.cat([torch.tensor([], dtype=k.dtype, device=k.device), k], dim=-2)
            v = torch.cat([torch.tensor([], dtype=v.dtype, device=v.device), v], dim=-2)
            self.cache += [k, v]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hk != hq)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, hq * h))


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (HF ``DeepseekV3Attention``, RoPE in "rotate half" form).

    v is zero-padded to the query/key head size before SDPA and the output sliced back, as HF does
    for its flash-attention path, so the CPU (and CUDA flash) kernel runs instead of the math one.
    """

    def __init__(self, cfg: MoEConfig, device: Device, dtype: torch.dtype | None) -> None:
        super().__init__()
        d, hq = cfg.d_model, cfg.num_heads
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk = cfg.head_size
        self.num_heads, self.kv_lora = hq, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, **kw)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, device, dtype)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, hq * self.qk, **kw)
        else:
            self.q_proj = nn.Linear(d, hq * self.qk, **kw)
        self.kv_a_proj = nn.Linear(d, cfg.kv_lora_rank + self.rope, **kw)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps, device, dtype)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, hq * (self.nope + self.vdim), **kw)
        self.o_proj = nn.Linear(hq * self.vdim, d, **kw)
        self.lora = bool(cfg.q_lora_rank)
        self.hf, self.interleave = cfg.deepseek_transformers, cfg.rope_interleave
        self.cache: list[torch.Tensor] | None = None  # transformers' DynamicCache (kv_cache), set by the model

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.hf:
            return self.hf_forward(x, cos, sin)
        b, s, _ = x.shape
        hq = self.num_heads
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.lora else self.q_proj(x)
        q = q.view(b, s, hq, self.qk)
        q_pass, q_rot = q[..., : self.nope], q[..., self.nope:]
        ckv = self.kv_a_proj(x)
        c, k_rot = ckv[..., : self.kv_lora], ckv[..., self.kv_lora:]
        kv = self.kv_b_proj(self.kv_a_norm(c)).view(b, s, hq, self.nope + self.vdim)
        k_pass, v = kv[..., : self.nope], kv[..., self.nope:]
        q_rot = apply_rope(q_rot, cos, sin)
        k_rot = apply_rope(k_rot.view(b, s, 1, self.rope), cos, sin).expand(b, s, hq, self.rope)
        q = torch.cat((q_pass, q_rot), dim=-1).transpose(1, 2)
        k = torch.cat((k_pass, k_rot), dim=-1).transpose(1, 2)
        v = F.pad(v, [0, self.qk - self.vdim]).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)[..., : self.vdim]
        return self.o_proj(y.transpose(1, 2).reshape(b, s, hq * self.vdim))

    def hf_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """transformers 5.24's ``DeepseekV3Attention.forward`` (and its ``expand_kv``), statement by statement.

        q is viewed as heads and split into its nope and rope parts; the latent ``kv_a_proj`` output is split,
        normed and viewed as one head; RoPE (interleaved pairs, ``apply_rotary_pos_emb_interleave``, or
        rotate-half); the latents go through the DynamicCache (``kv_cache``); the query is a ``cat``; the keys
        a ``new_empty`` filled by two ``copy_``; v is a split view of ``kv_b_proj``'s output, not padded, so
        SDPA's head sizes differ and the CPU runs its math kernel (``sdpa_attention_forward``: the output
        transposed and made contiguous, then reshaped).
        """
        b, s, _ = x.shape
        nope, rope, vdim = self.nope, self.rope, self.vdim
        q_states = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.lora else self.q_proj(x)
        q_states = q_states.view(b, s, -1, self.qk).transpose(1, 2)
        q_pass, q_rot = torch.split(q_states, [nope, rope], dim=-1)
        compressed_kv = self.kv_a_proj(x)
        kv_nope, k_rot = torch.split(compressed_kv, [self.kv_lora, rope], dim=-1)
        kv_nope = self.kv_a_norm(kv_nope)
        kv_nope = kv_nope.view(b, 1, s, self.kv_lora)
        k_rot = k_rot.view(b, 1, s, rope)
        q_rot, k_rot = (rope_interleave(q_rot, k_rot, cos, sin) if self.interleave
                        else (rope_half(q_rot, cos, sin), rope_half(k_rot, cos, sin)))
        if self.cache is not None:  # DynamicLayer.update: the compressed latents are cached
            kv_nope = torch.cat([torch.tensor([], dtype=kv_nope.dtype, device=kv_nope.device), kv_nope], dim=-2)
            k_rot = torch.cat([torch.tensor([], dtype=k_rot.dtype, device=k_rot.device), k_rot], dim=-2)
            self.cache += [kv_nope, k_rot]
        query_states = torch.cat((q_pass, q_rot), dim=-1)
        key_states, value_states = self._expand_kv(kv_nope, k_rot)
        y = F.scaled_dot_product_attention(query_states, key_states, value_states, is_causal=True,
                                           scale=self.qk ** -0.5)
        y = y.reshape(y.shape[0], -1, s, vdim).transpose(1, 2).contiguous()
        return self.o_proj(y.reshape(b, s, -1).contiguous())

    def _expand_kv(self, kv_nope: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``DeepseekV3Attention.expand_kv``: keys and values of every head from the latents."""
        b, _, s, _ = kv_nope.shape
        kv = self.kv_b_proj(kv_nope).view(b, s, -1, self.nope + self.vdim).transpose(1, 2)
        k_nope, value_states = torch.split(kv, [self.nope, self.vdim], dim=-1)
        k_rot = k_rot.expand(-1, k_nope.shape[1], -1, -1)
        key_states = kv.new_empty(*kv.shape[:-1], self.nope + self.rope)
        key_states[..., : self.nope].copy_(k_nope)
        key_states[..., self.nope:].copy_(k_rot)
        return key_states, value_states


def rope_interleave(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb_interleave`` (models/deepseek_v3): the pairs (x0, x1), (x2, x3), ...
    rotated on even/odd slices; cos, sin (S, r) in the rotate-half layout, whose first half is the angles."""
    cos = cos[..., : cos.shape[-1] // 2]
    sin = sin[..., : sin.shape[-1] // 2]
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
    k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return q_embed, k_embed


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` on one (B, heads, S, r) tensor: ``x·cos + rotate_half(x)·sin``."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return (x * cos) + (torch.cat((-x2, x1), dim=-1) * sin)


class Experts(nn.Module):
    """E SwiGLU experts as two 3-D parameters, run as transformers runs them: ``grouped_mm`` (its default)
    or the ``eager`` loop over the experts hit (``cfg.experts_implementation``)."""

    def __init__(self, cfg: MoEConfig, device: Device, dtype: torch.dtype | None) -> None:
        super().__init__()
        e, f, d = cfg.num_experts, cfg.expert_d_ff, cfg.d_model
        self.num_experts = e
        self.grouped = cfg.experts_implementation == "grouped_mm"
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(e, d, f, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        if self.grouped:
            return self.grouped_forward(x, top_i, top_w)
        return self.eager_forward(x, top_i, top_w)

    def grouped_forward(self, x: torch.Tensor, top_i: torch.Tensor,
                        top_w: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """transformers 5's ``grouped_mm_experts_forward`` (``integrations/moe.py``), statement by statement.

        The T·k (token, expert) pairs sorted by expert, the tokens gathered once, two grouped GEMMs over
        the whole 3-D weights (``torch.nn.functional.grouped_mm``, offsets from ``histc``), the routing
        weights applied, the pairs put back in token order and summed over k.
        """
        k, t, d = top_i.size(-1), x.size(0), x.size(-1)
        sample_weights = top_w.reshape(-1)
        expert_ids = top_i.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        selected = x[perm // k]
        sample_weights_g = sample_weights[perm]
        histc_input = expert_ids_g.float()
        tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        proj = F.grouped_mm(selected.to(self.gate_up_proj.dtype), self.gate_up_proj.transpose(-2, -1), offs=offsets)
        proj = _apply_gate(proj)
        proj = F.grouped_mm(proj.to(self.down_proj.dtype), self.down_proj.transpose(-2, -1), offs=offsets)
        weighted = proj * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=x.device)
        weighted = weighted[inv_perm]
        out = weighted.view(t, k, d).sum(dim=1)
        return out.to(x.dtype), [int(n) for n in tokens_per_expert.tolist()]

    def eager_forward(self, x: torch.Tensor, top_i: torch.Tensor,
                      top_w: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """transformers' ``MixtralExperts.forward`` (``experts_implementation="eager"``)."""
        out = torch.zeros_like(x)
        with torch.no_grad():
            mask = F.one_hot(top_i, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        counts = [0] * self.num_experts
        for expert in hit:
            e = expert[0]
            if e == self.num_experts:
                continue
            pos, token = torch.where(mask[e])
            counts[int(e)] = token.shape[0]
            current = x[token]
            gate, up = F.linear(current, self.gate_up_proj[e]).chunk(2, dim=-1)
            hidden = F.linear(F.silu(gate) * up, self.down_proj[e])
            hidden = hidden * top_w[token, pos, None]
            out.index_add_(0, token, hidden.to(out.dtype))
        return out, counts


def _apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' ``_default_apply_gate``: SiLU(gate)·up (its own frame: the chunk views die at its return)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MoE(nn.Module):
    """Router, routed experts, shared expert (and its gate); with ``aux_loss_coef`` it keeps its router logits."""

    def __init__(self, cfg: MoEConfig, device: Device, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.deepseek_transformers:  # DeepseekV3MoE's order: experts, then the router (the optimizer's order)
            self.experts = Experts(cfg, device, dtype)
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False, device=device, dtype=dtype)
        if not cfg.deepseek_transformers:
            self.experts = Experts(cfg, device, dtype)
        if cfg.deepseek_transformers:  # DeepseekV3TopkRouter's buffer (zeros: the scores' correction)
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, device=device, dtype=dtype))
        if cfg.shared_expert_d_ff:
            shared = cfg.dense_view().model_copy(update={"d_ff": cfg.shared_expert_d_ff})
            self.mlp = MLP(shared, device, dtype)  # named like a dense block's MLP: blocks.i.moe.mlp.*
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False, device=device, dtype=dtype)
        self.counts: list[int] = []
        self.history: list[list[int]] = []  # tokens per expert of every forward, in order
        self.router_logits: torch.Tensor | None = None  # kept for the load-balancing loss (aux_loss_coef > 0)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits, top-k weights, top-k expert ids) of the tokens ``h`` (T, d)."""
        cfg = self.cfg
        if cfg.deepseek_transformers:
            return self.hf_route(h)
        if cfg.router == "sigmoid":  # DeepSeek-V3: fp32 logits, sigmoid, group-limited top-k
            logits = F.linear(h.float(), self.router.weight.float())
            scores = logits.sigmoid()
            g = cfg.n_group
            groups = scores.view(-1, g, cfg.num_experts // g).topk(min(2, cfg.num_experts // g), dim=-1)[0].sum(-1)
            keep = torch.zeros_like(groups).scatter_(1, groups.topk(cfg.topk_group, dim=-1)[1], 1)
            mask = keep.unsqueeze(-1).expand(-1, g, cfg.num_experts // g).reshape(-1, cfg.num_experts)
            top_i = scores.detach().masked_fill(~mask.bool(), float("-inf")).topk(cfg.experts_per_token, dim=-1)[1]
            top_w = scores.gather(1, top_i)
            if cfg.norm_topk_prob:
                top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, top_w * cfg.routed_scaling_factor, top_i
        if cfg.router_fp32:
            logits = F.linear(h.float(), self.router.weight.float())
        else:
            logits = F.linear(h, self.router.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        top_w, top_i = torch.topk(probs, cfg.experts_per_token, dim=-1)
        if cfg.norm_topk_prob:
            top_w /= top_w.sum(dim=-1, keepdim=True)
        return logits, top_w.to(logits.dtype), top_i

    def hf_route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """transformers 5.24's ``DeepseekV3TopkRouter.forward``, statement by statement (``e_score_correction_bias``
        a buffer added to the scores for the choice only, group scores from each group's top two, in-place
        renormalisation)."""
        cfg = self.cfg
        e, g = cfg.num_experts, cfg.n_group
        router_logits = F.linear(h.type(torch.float32), self.router.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias
        group_scores = scores_for_choice.view(-1, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e)
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_indices = torch.topk(scores_for_choice, k=cfg.experts_per_token, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_indices)
        if cfg.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * cfg.routed_scaling_factor
        return router_logits, topk_weights, topk_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = x.view(-1, d)
        gated = self.cfg.shared_expert_d_ff and self.cfg.shared_expert_gate
        shared = self.mlp(h) if gated else None  # Qwen2MoeSparseMoeBlock: the shared expert first, its gate later
        logits, top_w, top_i = self.route(h)
        out, self.counts = self.experts(h, top_i, top_w)
        if torch._C._current_graph_task_id() == -1:  # not a checkpoint rerun inside backward
            self.history.append(self.counts)
            if self.cfg.aux_loss_coef:  # HF's output_router_logits: the logits are collected
                self.router_logits = logits
        if self.cfg.shared_expert_d_ff:
            if shared is None:  # DeepSeek: after the routed experts
                shared = self.mlp(h)
            if self.cfg.shared_expert_gate:
                shared = F.sigmoid(self.shared_gate(h)) * shared
            out = out + shared
        return out.view(b, s, d)


def load_balancing_loss_func(gate_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6): E · Σ_e f_e · P_e, over all MoE layers.

    transformers 5.24's ``load_balancing_loss_func`` (``models/mixtral/modeling_mixtral.py``, no attention
    mask), statement by statement: per layer the softmax of its router logits (in their dtype), the top-k
    of it, ``histc`` counts of the chosen experts and the per-expert sum of the probabilities, summed over
    layers and divided by the rows; f_e (the fraction of assignments) carries no gradient, P_e does.
    """
    compute_device = gate_logits[0].device
    tokens_per_expert_sum = torch.zeros(num_experts, dtype=torch.float32, device=compute_device)
    router_prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=compute_device)
    total_rows = 0.0
    for layer_gate in gate_logits:
        routing_weights = F.softmax(layer_gate.to(compute_device), dim=-1)
        _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
        tokens_per_expert_sum = tokens_per_expert_sum + torch.histc(
            selected_experts.reshape(-1).to(torch.float32), bins=num_experts, min=0, max=num_experts
        )
        router_prob_sum = router_prob_sum + routing_weights.float().sum(dim=0)
        total_rows = total_rows + routing_weights.shape[0]
    tokens_per_expert = tokens_per_expert_sum / total_rows
    router_prob_per_expert = router_prob_sum / total_rows
    overall_loss = torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
    return overall_loss * num_experts


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEConfig, i: int, device: Device, dtype: torch.dtype | None) -> None:
        super().__init__()
        dense = cfg.dense_view()
        # DeepseekV3DecoderLayer registers its norms last: the parameters' order (the optimizer's) follows it
        norms_last = cfg.deepseek_transformers
        if not norms_last:
            self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)
        if cfg.attention_type == "mla":
            self.attn: nn.Module = MLAttention(cfg, device, dtype)
        elif cfg.qk_norm != "none":
            self.attn = QKNormAttention(cfg, device, dtype)
        else:
            self.attn = Attention(dense, device, dtype)
        if not norms_last:
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)
        if cfg.is_moe_layer(i):
            self.moe = MoE(cfg, device, dtype)
        else:
            self.mlp = MLP(dense, device, dtype)
        if norms_last:
            self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        ff = self.moe if hasattr(self, "moe") else self.mlp
        return x + ff(self.norm2(x))


class MoETransformer(nn.Module):
    """Token ids (B, S) -> logits, or the mean cross-entropy (plus α·the load-balancing loss) when targets are given."""

    def __init__(self, cfg: MoEConfig, device: Device = None, dtype: torch.dtype | None = None,
                 activation_checkpointing: str = "none") -> None:
        super().__init__()
        self.cfg = cfg
        self.checkpointing = activation_checkpointing == "full"
        kw = {"device": device, "dtype": dtype}
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, **kw)
        self.blocks = nn.ModuleList([MoEBlock(cfg, i, device, dtype) for i in range(cfg.num_layers)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, **kw)
        if cfg.rope_buffers:  # transformers' rotary embedding: inv_freq and original_inv_freq (docs/transformer.md)
            r = cfg.dense_view().rotary_dim
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
            self.register_buffer("inv_freq", inv_freq.to(device=device, dtype=dtype), persistent=False)
            self.register_buffer("original_inv_freq", self.inv_freq.clone(), persistent=False)

    @property
    def tokens_per_expert(self) -> list[list[int]]:
        """Tokens each routed expert received in the last forward, per MoE layer."""
        return [block.moe.counts for block in self.blocks if hasattr(block, "moe")]

    def routing_history(self) -> list[list[list[int]]]:
        """Per forward run so far (checkpoint reruns excluded), the tokens per expert of each MoE layer."""
        layers = [block.moe.history for block in self.blocks if hasattr(block, "moe")]
        return [list(step) for step in zip(*layers, strict=True)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        b, s = idx.shape
        x = self.tok_emb(idx)
        amp = torch.is_autocast_enabled(x.device.type) and not self.cfg.rope_stream_dtype
        dtype = torch.get_autocast_dtype(x.device.type) if amp else x.dtype
        with torch.autocast(x.device.type, enabled=False) if self.cfg.rope_stream_dtype else contextlib.nullcontext():
            cos, sin = rope_tables(self.cfg.dense_view(), s, x.device, dtype)
        cache: list[torch.Tensor] | None = [] if self.cfg.kv_cache and not self.checkpointing else None
        for block in self.blocks:  # transformers' DynamicCache (kv_cache), held by `cache` until forward returns
            block.attn.cache = cache
        for block in self.blocks:
            x = checkpoint(block, x, cos, sin, use_reentrant=False) if self.checkpointing else block(x, cos, sin)
        for block in self.blocks:
            block.attn.cache = None
        x = self.norm_f(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight)
        if targets is None:
            return logits
        if self.cfg.loss_upcast or self.cfg.labels_from_inputs:  # transformers' ForCausalLMLoss
            from estimator.measure.transformer import causal_lm_loss

            loss = causal_lm_loss(logits, targets, self.cfg.vocab_size, self.cfg.loss_upcast,
                                  self.cfg.labels_from_inputs)
        else:
            loss = F.cross_entropy(logits.view(b * s, -1), targets.view(b * s))
        if self.cfg.aux_loss_coef:  # MixtralForCausalLM.forward with output_router_logits=True
            moes = [blk.moe for blk in self.blocks if hasattr(blk, "moe")]
            router_logits = tuple(moe.router_logits for moe in moes)
            for moe in moes:
                moe.router_logits = None
            aux_loss = load_balancing_loss_func(router_logits, self.cfg.num_experts, self.cfg.experts_per_token)
            loss += self.cfg.aux_loss_coef * aux_loss
        return loss


def build_moe(cfg: MoEConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              activation_checkpointing: str = "none") -> MoETransformer:
    """The model of ``cfg`` on ``device`` in ``dtype`` (small normal init; experts 0.02 like the linears)."""
    model = MoETransformer(cfg, device, dtype, activation_checkpointing)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model
