"""Read a local Hugging Face ``config.json`` into TransformerConfig field values (no transformers).

Supported ``model_type``s and what each maps to (all parameter counts exact):

* ``gpt2``: learned positions, biased layernorm and linears, GELU MLP (``n_inner`` or 4·d), tied head.
* ``llama``, ``mistral``: RoPE, RMSNorm, SwiGLU, no biases (``attention_bias``/``mlp_bias`` must
  agree), GQA, optional ``head_dim``; untied unless ``tie_word_embeddings``.
* ``qwen2``: as llama plus biases on the q/k/v projections only (``qkv_bias``).
* ``phi3``: llama-shaped (its fused qkv_proj / gate_up_proj hold the same parameters).
* ``gpt_neox``: biased layernorm and linears, GELU MLP, partial RoPE (``rotary_pct``), parallel
  residual (``use_parallel_residual``), untied ``embed_out``.

Every type (dense and MoE) also gets the options that make the project's model run the step transformers runs
(``HF_STEP``; docs/hf.md): the loss upcasts the logits to fp32 and the labels are the input ids.

Settings that change neither the parameter count nor what our torch model computes within
``max_seq_len`` are ignored: dropout (but said: :func:`analytic_omissions`), ``rope_scaling``,
``sliding_window`` (Mistral/Qwen2 attend to a window only beyond it; said from there:
:func:`analytic_omissions`), initialisers, token ids. Model
types whose blocks differ (q/k norms as in qwen3, Gemma's scaled embeddings) are refused rather than
approximated.

Mixture-of-experts types map to the ``moe`` family (``estimator.families.moe``, docs/moe.md):
``mixtral``, ``qwen2_moe`` (gated shared expert, q/k/v biases), ``qwen3_moe`` (per-head q/k norms),
``olmoe`` (q/k norms over all heads), ``deepseek_v3`` (MLA, dense first blocks, shared experts,
sigmoid group-limited routing; the multi-token-prediction module is not part of the model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from estimator.errors import EstimatorError

_MISSING = object()


class _Reader:
    """Typed access to one config.json with errors that name the file and key."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def get(self, key: str, default: Any = _MISSING, kind: type | tuple[type, ...] = int) -> Any:
        value = self.data.get(key, default)
        if value is _MISSING:
            raise self._missing(key)
        if value is None and default is None:
            return None
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise EstimatorError(f"{self.path}: key {key!r} must be {names}, got {value!r}")
        return value

    def first(self, keys: tuple[str, ...], default: Any = _MISSING, kind: type = int) -> Any:
        """The first of ``keys`` present (configs renamed some keys across versions)."""
        for key in keys:
            if key in self.data:
                return self.get(key, kind=kind)
        if default is _MISSING:
            raise self._missing(keys[0])
        return default

    def rope_theta(self, default: float, legacy: str = "rope_theta") -> float:
        """``rope_theta`` at the top level or, in newer configs, inside ``rope_parameters``."""
        params = self.data.get("rope_parameters")
        if isinstance(params, dict) and "rope_theta" in params:
            return _Reader(self.path, params).get("rope_theta", kind=float)
        return self.get(legacy, default, kind=float)

    def _missing(self, key: str) -> EstimatorError:
        model_type = self.data.get("model_type")
        return EstimatorError(f"{self.path}: missing key {key!r} (model_type {model_type!r})")

    def refuse(self, message: str) -> EstimatorError:
        return EstimatorError(f"{self.path}: {message}")


def _gelu(r: _Reader, key: str, default: str) -> str:
    """The transformer family's ``mlp`` for the GELU that ``key`` names (transformers/activations.py, ACT2FN).

    ``gelu_new`` is transformers' tanh approximation written in Python (``NewGELUActivation``), modelled op by op
    (``mlp: gelu_new``); the other GELUs (``gelu``: ``F.gelu``; ``gelu_pytorch_tanh``: ``F.gelu(approximate=
    'tanh')``) are one torch op that saves its input, as ``mlp: gelu``. Anything else is refused.
    """
    act = r.get(key, default, kind=str)
    if not act.startswith("gelu"):
        raise r.refuse(f"key {key!r} is {act!r}; only gelu variants are supported for this model_type")
    return "gelu_new" if act == "gelu_new" else "gelu"


def _gpt2(r: _Reader) -> dict[str, Any]:
    return {
        "vocab_size": r.get("vocab_size"),
        "d_model": r.get("n_embd"),
        "num_layers": r.get("n_layer"),
        "num_heads": r.get("n_head"),
        "d_ff": r.get("n_inner", None),
        "mlp": _gelu(r, "activation_function", "gelu_new"),
        "fused_qkv": True,  # c_attn: one projection, split into q, k and v
        "kv_cache": r.get("use_cache", True, kind=bool),  # GPT2Model fills a DynamicCache when use_cache
        "norm": "layernorm",
        "bias": True,
        "positions": "learned",
        "max_seq_len": r.get("n_positions"),
        "tie_embeddings": r.get("tie_word_embeddings", True, kind=bool),
        "norm_eps": r.get("layer_norm_epsilon", 1e-5, kind=float),
        # GPT2Model.drop, GPT2Attention.resid_dropout / GPT2MLP.dropout, attn_pdrop as SDPA's dropout_p
        # (configuration_gpt2.py: 0.1 each by default)
        "embd_dropout": r.get("embd_pdrop", 0.1, kind=float),
        "resid_dropout": r.get("resid_pdrop", 0.1, kind=float),
        "attn_dropout": r.get("attn_pdrop", 0.1, kind=float),
    }


def _llama_like(r: _Reader, qkv_bias: bool = False) -> dict[str, Any]:
    act = r.get("hidden_act", "silu", kind=str)
    if act != "silu":
        raise r.refuse(f"key 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported for this model_type")
    attention_bias = r.get("attention_bias", False, kind=bool)
    mlp_bias = r.get("mlp_bias", False, kind=bool)
    if attention_bias != mlp_bias:
        raise r.refuse("keys 'attention_bias' and 'mlp_bias' differ; biases on one half are unsupported")
    rotary = r.get("partial_rotary_factor", 1.0, kind=float)
    values: dict[str, Any] = {
        "vocab_size": r.get("vocab_size"),
        "d_model": r.get("hidden_size"),
        "num_layers": r.get("num_hidden_layers"),
        "num_heads": r.get("num_attention_heads"),
        "num_kv_heads": r.get("num_key_value_heads", None),
        "head_dim": r.get("head_dim", None),
        "d_ff": r.get("intermediate_size"),
        "mlp": "swiglu",
        "norm": "rmsnorm",
        "bias": attention_bias,
        "qkv_bias": qkv_bias,
        "positions": "rope",
        "rope_theta": r.rope_theta(10000.0),
        "max_seq_len": r.get("max_position_embeddings"),
        "tie_embeddings": r.get("tie_word_embeddings", False, kind=bool),
        "norm_eps": r.get("rms_norm_eps", 1e-6, kind=float),
    }
    if rotary != 1.0:
        values["rotary_pct"] = rotary
    return values


def _phi3(r: _Reader) -> dict[str, Any]:
    """Llama-shaped; its rotary embedding is applied as GPT-NeoX's (a cat with the pass-through dims). resid_pdrop:
    Phi3DecoderLayer's resid_attn_dropout and resid_mlp_dropout (its embd_pdrop is applied nowhere in 5.24)."""
    return {**_llama_like(r), "rope_concat": True, "fused_qkv": True, "fused_gate_up": True,
            "resid_dropout": r.get("resid_pdrop", 0.0, kind=float)}


def _qwen2(r: _Reader) -> dict[str, Any]:
    return _llama_like(r, qkv_bias=True)


def _gpt_neox(r: _Reader) -> dict[str, Any]:
    mlp = _gelu(r, "hidden_act", "gelu")
    if not r.get("attention_bias", True, kind=bool):
        raise r.refuse("key 'attention_bias' is false; gpt_neox without attention biases is not supported")
    return {
        "vocab_size": r.get("vocab_size"),
        "d_model": r.get("hidden_size"),
        "num_layers": r.get("num_hidden_layers"),
        "num_heads": r.get("num_attention_heads"),
        "d_ff": r.get("intermediate_size"),
        "mlp": mlp,
        "norm": "layernorm",
        "bias": True,
        "positions": "rope",
        "rotary_pct": r.first(("rotary_pct", "partial_rotary_factor"), 0.25, kind=float),
        "rope_theta": r.rope_theta(10000.0, legacy="rotary_emb_base"),
        "parallel_residual": r.get("use_parallel_residual", True, kind=bool),
        "rope_concat": True,  # GPTNeoX's apply_rotary_pos_emb: cat of the rotated and the passed dims
        "fused_qkv": True,  # query_key_value: one projection (its output chunked per head; here sliced)
        "max_seq_len": r.get("max_position_embeddings"),
        "tie_embeddings": r.get("tie_word_embeddings", False, kind=bool),
        "norm_eps": r.get("layer_norm_eps", 1e-5, kind=float),
        # hidden_dropout: GPTNeoXModel.emb_dropout, GPTNeoXLayer.post_attention_dropout and post_mlp_dropout
        "embd_dropout": r.get("hidden_dropout", 0.0, kind=float),
        "resid_dropout": r.get("hidden_dropout", 0.0, kind=float),
    }


def _moe_common(r: _Reader, experts_key: str, width_key: str, attention_bias: bool = False) -> dict[str, Any]:
    """What every MoE model type shares (a Llama-style block whose MLP is routed); family ``moe``."""
    act = r.get("hidden_act", "silu", kind=str)
    if act != "silu":
        raise r.refuse(f"key 'hidden_act' is {act!r}; only 'silu' (SwiGLU experts) is supported")
    if r.get("attention_bias", False, kind=bool) != attention_bias:
        raise r.refuse("key 'attention_bias' is true; biased attention projections are not supported "
                       "for this model_type")
    aux = r.get("router_aux_loss_coef", 0.0, kind=float) if r.get("output_router_logits", False, kind=bool) else 0.0
    return {
        "family": "moe",
        "vocab_size": r.get("vocab_size"),
        "d_model": r.get("hidden_size"),
        "num_layers": r.get("num_hidden_layers"),
        "num_heads": r.get("num_attention_heads"),
        "num_kv_heads": r.get("num_key_value_heads", None),
        "head_dim": r.get("head_dim", None),
        "num_experts": r.get(experts_key),
        "experts_per_token": r.get("num_experts_per_tok"),
        "expert_d_ff": r.get(width_key),
        "aux_loss_coef": aux,
        "rope_theta": r.rope_theta(10000.0),
        "max_seq_len": r.get("max_position_embeddings"),
        "tie_embeddings": r.get("tie_word_embeddings", False, kind=bool),
        "norm_eps": r.get("rms_norm_eps", 1e-6, kind=float),
    }


def _sparse_layers(r: _Reader, values: dict[str, Any]) -> dict[str, Any]:
    """Qwen-MoE's ``decoder_sparse_step`` (block i is MoE iff (i+1) % step == 0) and ``mlp_only_layers``."""
    if r.get("mlp_only_layers", [], kind=list):
        raise r.refuse("key 'mlp_only_layers' is not empty; dense blocks at arbitrary positions are not supported")
    step = r.get("decoder_sparse_step", 1)
    if step != 1:
        values.update(moe_layer_step=step, d_ff=r.get("intermediate_size"))
    return values


def _mixtral(r: _Reader) -> dict[str, Any]:
    return _moe_common(r, "num_local_experts", "intermediate_size")


def _qwen2_moe(r: _Reader) -> dict[str, Any]:
    values = _moe_common(r, "num_experts", "moe_intermediate_size")
    values.update(qkv_bias=r.get("qkv_bias", True, kind=bool), norm_topk_prob=r.get("norm_topk_prob", False, kind=bool),
                  shared_expert_d_ff=r.get("shared_expert_intermediate_size"), shared_expert_gate=True)
    return _sparse_layers(r, values)


def _qwen3_moe(r: _Reader) -> dict[str, Any]:
    values = _moe_common(r, "num_experts", "moe_intermediate_size")
    values.update(qk_norm="head", norm_topk_prob=r.get("norm_topk_prob", False, kind=bool))
    return _sparse_layers(r, values)


def _olmoe(r: _Reader) -> dict[str, Any]:
    values = _moe_common(r, "num_experts", "intermediate_size")
    if r.get("clip_qkv", None, kind=(int, float)) is not None:
        raise r.refuse("key 'clip_qkv' is set; clamping q/k/v is not modelled")
    values.update(qk_norm="full", norm_topk_prob=r.get("norm_topk_prob", False, kind=bool))
    return values


def _deepseek_v3(r: _Reader) -> dict[str, Any]:
    values = _moe_common(r, "n_routed_experts", "moe_intermediate_size")
    if r.get("moe_layer_freq", 1) != 1:
        raise r.refuse("key 'moe_layer_freq' is not 1; only consecutive MoE blocks are supported")
    if r.get("scoring_func", "sigmoid", kind=str) != "sigmoid":
        raise r.refuse("key 'scoring_func' is not 'sigmoid'; deepseek_v3 routes with sigmoid scores")
    values.pop("num_kv_heads")
    values.pop("head_dim")
    values.update(
        attention_type="mla", q_lora_rank=r.get("q_lora_rank", None), kv_lora_rank=r.get("kv_lora_rank"),
        qk_nope_head_dim=r.get("qk_nope_head_dim"), qk_rope_head_dim=r.get("qk_rope_head_dim"),
        v_head_dim=r.get("v_head_dim"), d_ff=r.get("intermediate_size"),
        first_dense_layers=r.get("first_k_dense_replace", 0),
        shared_expert_d_ff=r.get("n_shared_experts", 0) * r.get("moe_intermediate_size"),
        router="sigmoid", router_fp32=True, norm_topk_prob=r.get("norm_topk_prob", True, kind=bool),
        routed_scaling_factor=r.get("routed_scaling_factor", 1.0, kind=float),
        n_group=r.get("n_group", 1), topk_group=r.get("topk_group", 1),
        deepseek_transformers=True, rope_interleave=r.get("rope_interleave", True, kind=bool),
    )
    return values


_READERS: dict[str, Callable[[_Reader], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "gpt2": _gpt2,
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _qwen2,
    "phi3": _phi3,
    "gpt_neox": _gpt_neox,
}


MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def family_of(path: str | Path) -> str:
    """``moe`` when the config.json at ``path`` (or relative to the working directory) is an MoE type,
    else ``transformer`` (also when it cannot be read: validation reports that later)."""
    p = Path(path).expanduser()
    p = p / "config.json" if p.is_dir() else p
    try:
        if p.stat().st_size > MAX_CONFIG_JSON_BYTES:
            return "transformer"  # refused with its size when it is loaded
        model_type = json.loads(p.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return "transformer"
    return "moe" if isinstance(model_type, str) and model_type in MOE_TYPES else "transformer"


def supported_model_types() -> list[str]:
    return sorted(_READERS)


MAX_CONFIG_JSON_BYTES = 16 << 20
"""The largest config.json read (docs/cli.md, bounds): a 100 MB one took 1.4 s and 236 MB to parse."""


def load_config_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The file (``path`` or ``path/config.json``) and its JSON object; one-line errors naming the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise EstimatorError(f"Hugging Face config not found: {p}")
    if p.stat().st_size > MAX_CONFIG_JSON_BYTES:  # published ones are kilobytes (ImageNet-21k labels: ~1 MB)
        raise EstimatorError(f"{p}: larger than {MAX_CONFIG_JSON_BYTES >> 20} MiB ({p.stat().st_size:,} bytes); "
                             "a config.json is kilobytes")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise EstimatorError(f"{p}: invalid JSON at {where}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EstimatorError(f"cannot read {p}: {exc}") from None
    if not isinstance(data, dict):
        raise EstimatorError(f"{p}: expected a JSON object, got {type(data).__name__}")
    if data.get("model_type") is None:
        raise EstimatorError(f"{p}: missing key 'model_type'")
    if not isinstance(data["model_type"], str):
        raise EstimatorError(f"{p}: key 'model_type' must be a string, got {data['model_type']!r}")
    return p, data


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """TransformerConfig field values (``family`` included) from a local HF ``config.json``.

    ``path`` may be the file or the directory holding it. Problems raise EstimatorError with one
    line naming the file (and the key).
    """
    p, data = load_config_json(path)
    return analytic_values(p, data)


#: config.json's dropout probabilities the analytic families do not model, per covered type, with transformers'
#: defaults when a key is absent (0.0): attention dropout with rotary or grouped-query attention and in the MoE
#: types (torch's math attention is modelled for GPT-2's heads only). Modelled (TransformerConfig embd_dropout,
#: resid_dropout, attn_dropout): GPT-2's three (``configuration_gpt2.py``: 0.1 each by default), Phi-3's
#: resid_pdrop, GPT-NeoX's hidden_dropout; Phi-3's embd_pdrop is applied nowhere in transformers 5.24.
_DROPOUT_DEFAULTS: dict[str, dict[str, float]] = {"gpt2": {}}


def sliding_window_in_force(model_type: Any, data: dict[str, Any]) -> int | None:
    """The attention window transformers 5.24 applies for this config.json, or None.

    ``mistral`` (4096 when absent), ``phi3`` and ``mixtral`` use ``sliding_window`` when it is not None
    (``mask_function = create_sliding_window_causal_mask``); ``qwen2``, ``qwen2_moe`` and ``qwen3_moe`` only
    with ``use_sliding_window`` (false by default; their configuration files). The other covered types
    have none.
    """
    if model_type in ("qwen2", "qwen2_moe", "qwen3_moe") and data.get("use_sliding_window") is not True:
        return None
    if model_type not in ("mistral", "phi3", "mixtral", "qwen2", "qwen2_moe", "qwen3_moe"):
        return None
    window = data.get("sliding_window", 4096 if model_type in ("mistral", "qwen2", "qwen2_moe", "qwen3_moe")
                      else None)
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def analytic_omissions(section: dict[str, Any], source_dir: Path, seq_len: int | None = None) -> tuple[str, ...]:
    """What the analytic family leaves out of the step transformers runs for this ``hf_config``/``hub``
    section: one sentence each, empty when it models it all (or the engine is transformers). Measured on
    the tiny configs of ``benchmarks/hf_agreement.py`` at S=256 (docs/hf.md).

    ``seq_len``: the training sequence length; a sliding window no longer than it is said (transformers'
    ``masking_utils._ignore_causal_mask_sdpa`` keeps SDPA's ``is_causal`` only while ``kv_length`` is below
    the window; from there it passes an explicit mask)."""
    key = next((k for k in HF_SOURCE_KEYS if k in section), None)
    if key is None:
        return ()
    _, data = load_config_json(config_json_path(key, section[key], source_dir))
    model_type = data.get("model_type")
    if (section.get("engine") or default_engine(model_type)) != "analytic":
        return ()
    defaults = _DROPOUT_DEFAULTS.get(model_type, {"attention_dropout": 0.0})
    dropout = {k: data.get(k, d) for k, d in defaults.items()}
    active = [f"{k}={v}" for k, v in dropout.items() if isinstance(v, (int, float)) and v > 0]
    found = []
    if active:
        found.append(f"dropout ({', '.join(active)}) is not modelled: attention dropout with rotary or grouped-query "
                     "attention makes the CPU take torch's math attention, which keeps the attention probabilities, "
                     "the dropout's noise and the dropped probabilities for backward (a tiny GPT-2 as published "
                     "peaked 54 % higher at S=256 before its dropout was modelled); --set model.engine=transformers "
                     "traces the real model")
    window = sliding_window_in_force(model_type, {**data, **(section.get("config") or {})})
    if window is not None and seq_len is not None and seq_len >= window:
        found.append(f"sliding-window attention (sliding_window={window}, seq_len={seq_len}) is not modelled: "
                     "from a sequence as long as the window transformers passes SDPA an explicit mask, and the CPU "
                     "runs torch's math attention, which keeps the (B, H, S, S) probabilities for backward (a tiny "
                     "Mistral with a window of 16 at S=64 peaked 5.6 % higher); CUDA's memory-efficient kernel "
                     "keeps only the mask; --set model.engine=transformers traces the real model")
    return tuple(found)


def analytic_values(p: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The analytic family's field values for the config.json ``data`` read from ``p``."""
    model_type = data.get("model_type")
    reader = _READERS.get(model_type) if isinstance(model_type, str) else None
    if reader is None:
        raise EstimatorError(
            f"{p}: unsupported model_type {model_type!r} (supported: {', '.join(supported_model_types())})"
        )
    values = reader(_Reader(p, data))
    values.update(HF_STEP)
    if values.get("positions") == "rope" and values.get("family", "transformer") == "transformer":
        values.update(HF_ATTENTION)
    elif values.get("family") == "moe":  # the MoE torch model has them for every attention (MLA: transformers' form)
        values.update(HF_ATTENTION)
    return {"family": "transformer", **{k: v for k, v in values.items() if v is not None}}


#: What transformers' model does beyond the architecture, as transformer-family options (docs/hf.md): its
#: causal-LM loss upcasts the logits and takes the input ids as labels (``ForCausalLMLoss``).
HF_STEP: dict[str, Any] = {"loss_upcast": True, "labels_from_inputs": True}
#: ... and its attention (dense types): the rotary embedding in the stream's dtype, made with autocast off, and the
#: DynamicCache a training forward fills (``use_cache`` is on by default)
HF_ATTENTION: dict[str, Any] = {"rope_stream_dtype": True, "kv_cache": True, "rope_buffers": True}


# --------------------------------------------------------------------------- hf_config / hub sections
ENGINES = ("analytic", "transformers")
"""``model.engine``: the analytic families (instant, the types above) or the real transformers model traced."""
HF_SOURCE_KEYS = ("hf_config", "hub")


def config_json_path(key: str, value: Any, source_dir: Path) -> Path:
    """The config.json a ``hf_config: PATH`` (relative to ``source_dir``) or ``hub: org/name`` names."""
    if not isinstance(value, str) or not value.strip():
        raise EstimatorError(f"model.{key}: expected a {'path' if key == 'hf_config' else 'hub id org/name'}, "
                             f"got {value!r}")
    if key == "hub":
        from estimator.hub import hub_file

        return hub_file(value.strip())
    path = Path(value).expanduser()
    return path if path.is_absolute() else source_dir / path


_ENGINE_DEFAULT: ContextVar[str] = ContextVar("engine_default", default="analytic")


@contextmanager
def engine_default(engine: str) -> Iterator[None]:
    """The engine a covered ``model_type`` gets when ``model.engine`` is not given, while the block runs.

    ``estimate`` keeps ``analytic`` (instant). ``verify`` asks for ``transformers``: it measures the model a
    transformers user runs, and compares it with the trace of that same model (docs/hf.md).
    """
    token = _ENGINE_DEFAULT.set(engine)
    try:
        yield
    finally:
        _ENGINE_DEFAULT.reset(token)


def default_engine(model_type: Any) -> str:
    """``analytic`` for a covered type unless :func:`engine_default` says ``transformers`` -- and then still
    for the MoE types (whose verify re-estimates with the measured routing, docs/moe.md) and when
    transformers is not installed; ``transformers`` for every other type."""
    from estimator.families.hf import transformers_installed

    if model_type not in _READERS:
        return "transformers"
    if _ENGINE_DEFAULT.get() == "analytic" or model_type in MOE_TYPES or not transformers_installed():
        return "analytic"
    return "transformers"


def _engine(section: dict[str, Any], model_type: Any) -> str:
    engine = section.pop("engine", None)
    if engine is not None and engine not in ENGINES:
        raise EstimatorError(f"model.engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine is None:
        return default_engine(model_type)
    if engine == "analytic" and model_type not in _READERS:
        raise EstimatorError(f"model.engine: the analytic families cover {', '.join(supported_model_types())}, "
                             f"not {model_type!r}; use engine: transformers (the real model, traced)")
    return engine


def expand_hf_section(section: dict[str, Any], source_dir: Path) -> dict[str, Any]:
    """A model section with ``hf_config`` or ``hub`` as the family section it stands for.

    The analytic family (``transformer``/``moe``) for a covered ``model_type`` unless ``engine:
    transformers``; the ``hf`` family (the real transformers model, traced; docs/hf.md) otherwise.
    Keys beside the source override: the analytic family's fields, or for ``hf`` ``task`` and
    ``config: {key: value}`` (merged into config.json's keys).
    """
    from estimator.families.hf import INSTALL_HINT, transformers_installed

    section = dict(section)
    key = next(k for k in HF_SOURCE_KEYS if k in section)
    value = section.pop(key)
    path, data = load_config_json(config_json_path(key, value, source_dir))
    model_type = data.get("model_type")
    engine = _engine(section, model_type)
    if engine == "analytic":
        return {**analytic_values(path, data), **section}
    if not transformers_installed():
        covered = "" if model_type not in _READERS else " with engine: transformers"
        raise EstimatorError(f"model.{key}: model_type {model_type!r}{covered} is built by transformers, which is "
                             f"not installed (the analytic families cover {', '.join(supported_model_types())}); "
                             f"{INSTALL_HINT}")
    overrides = section.pop("config", {})
    if not isinstance(overrides, dict):
        raise EstimatorError(f"model.config: expected a mapping of config.json keys, got {overrides!r}")
    section.pop("family", None)
    return {"family": "hf", "config": {**data, **overrides}, "source": str(value), **section}


def section_family(section: dict[str, Any], source_dir: Path | None = None) -> str:
    """The family a raw ``hf_config``/``hub`` section validates as (``hf``, ``moe`` or ``transformer``),
    for --set path checks; ``transformer`` when the file cannot be read (validation reports that)."""
    key = next((k for k in HF_SOURCE_KEYS if k in section), None)
    if key is None:
        return "transformer"
    try:
        _, data = load_config_json(config_json_path(key, section[key], source_dir or Path.cwd()))
    except EstimatorError:
        return "transformer"
    model_type = data.get("model_type")
    engine = section.get("engine") or default_engine(model_type)
    if engine == "transformers":
        return "hf"
    return "moe" if model_type in MOE_TYPES else "transformer"


def checkpoint_of(section: dict[str, Any], source_dir: Path) -> Any:
    """The safetensors count of the checkpoint beside an ``hf_config``/``hub`` config.json, or None.

    Only what is already on disk is read (the headers); for a hub id nothing is downloaded but config.json.
    """
    from estimator.safetensors_header import checkpoint_count

    key = next((k for k in HF_SOURCE_KEYS if k in section), None)
    if key is None:
        return None
    path, _ = load_config_json(config_json_path(key, section[key], source_dir))
    return checkpoint_count(path.parent)
