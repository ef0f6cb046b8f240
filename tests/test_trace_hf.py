"""Hugging Face decoders with grouped-query attention and SDPA, traced as the module family, against verify.

transformers branches on "am I being traced" (``transformers.utils.import_utils.is_tracing``: dynamo,
``torch.jit``, FX proxies, and ``FakeTensor``). In training, 5.24's ``masking_utils`` checks whether
``position_ids`` describe packed sequences only ``if not is_tracing(...)``: under fake tensors it kept a
packed-sequence mask, built an explicit attention mask and called SDPA with it and ``repeat_kv``'d keys
and values, where the real step passes ``is_causal`` and ``enable_gqa`` (more saved for backward in the
trace). The trace now knows the values of tensors computed from constants (known_values.py) and
transformers sees them as not traced. These tests hold the trace to the real step's path (the SDPA
calls' arguments) and to its bytes (every verify figure).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from estimator.loader import validate_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from estimator.api import estimate  # noqa: E402
from estimator.measure import verify as verify_module  # noqa: E402

FACTORY = '''
import transformers


def causal_lm(model_type, attn="sdpa", **config):
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    model.config.use_cache = False
    return model.train()
'''
SMALL = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hf_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hf_factory", raising=False)


def config(model_type: str, precision: str = "fp32", **extra: Any) -> Any:
    model = {"module": "hf_factory:causal_lm", "kwargs": {"model_type": model_type, **SMALL, **extra},
             "inputs": [{"shape": [2, 12], "dtype": "int64", "high": 96}], "loss": "cross_entropy"}
    return validate_config({"model": model, "training": {"precision": precision}, "optimizer": {"name": "adamw"}})


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """(is fake, mask given, is_causal, enable_gqa, q heads, k heads) of every SDPA call transformers makes."""
    calls: list[tuple[Any, ...]] = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
            **kwargs: Any) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        calls.append((isinstance(query, FakeTensor), attn_mask is not None, is_causal, kwargs.get("enable_gqa", False),
                      query.shape[1], key.shape[1]))
        return real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize(("model_type", "precision"), [("qwen2", "fp32"), ("llama", "fp32"), ("qwen2", "amp-bf16")])
def test_gqa_sdpa_decoder_matches_the_real_step(factory: None, sdpa_calls: list[tuple[Any, ...]], model_type: str,
                                                precision: str) -> None:
    result = verify_module.run_verify(config(model_type, precision), "cpu")
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []
    traced = {call[1:] for call in sdpa_calls if call[0]}
    real = {call[1:] for call in sdpa_calls if not call[0]}
    # the trace took the real step's path: no mask, is_causal, 4 query heads on 2 k/v heads (enable_gqa)
    assert traced == real == {(False, True, True, 4, 2)}


def test_eager_attention_differs_and_is_traced_as_it_runs(factory: None) -> None:
    """Eager attention (repeat_kv, explicit softmax) is another real path: traced exactly too, with more
    bytes saved for backward than SDPA's (it keeps the S x S probabilities)."""
    result = verify_module.run_verify(config("llama", attn="eager"), "cpu")
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []
    assert estimate(config("llama", attn="eager"), "cpu").saved_activation_bytes > \
        estimate(config("llama"), "cpu").saved_activation_bytes
