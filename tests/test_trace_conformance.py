"""A small representative of the conformance suite (benchmarks/conformance.py), run as the suite runs it.

The suite estimates third-party architectures by tracing them and measures the real CPU step the way
``verify --device cpu`` does; here a few of its cases that need nothing beyond the test extra: an LSTM
language model, ``nn.TransformerEncoder`` (which deep-copies its layer while being built), a
``torch.utils.checkpoint`` MLP and GPT-2 from transformers (dropout 0.1, tied head). Both peaks exact.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "conformance.py"


@pytest.fixture(scope="module")
def conformance() -> Any:
    spec = importlib.util.spec_from_file_location("conformance", SUITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["conformance"] = module  # the cases' factories are "conformance:<name>"
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("conformance", None)


def test_the_suite_covers_the_issue(conformance: Any) -> None:
    cases = conformance.CASES
    assert len(cases) >= 30
    assert {c.source for c in cases} == {"transformers", "torchvision", "timm", "torch"}
    assert {c.precision for c in cases} == {"fp32", "bf16", "amp-bf16"}
    assert any(c.kwargs.get("checkpointing") for c in cases) and any(c.kwargs.get("freeze") for c in cases)
    assert len({c.name for c in cases}) == len(cases)


@pytest.mark.parametrize("name", ["torch lstm bidirectional", "torch TransformerEncoder", "torch checkpointed mlp",
                                  "gpt2"])
def test_cases_are_exact(conformance: Any, name: str) -> None:
    case = next(c for c in conformance.CASES if c.name == name)
    assert conformance.available(case) is None
    outcome = conformance.run_case(case)
    assert outcome.error == ""
    assert (outcome.estimate, outcome.first_estimate) == (outcome.measured, outcome.first_measured)
    assert outcome.measured > 0
