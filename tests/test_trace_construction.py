"""Tracing modules whose constructors cannot run on fake tensors, and errors that name the user's line.

The constructors read tensor values (``.item()``, ``.tolist()``, ``nn.init.trunc_normal_``) or draw
Python-side random numbers from tensors: the trace builds them for real on the CPU and converts their
tensors to fake ones (estimator/measure/module_build.py). Each estimate is checked against verify's
real CPU step, figure by figure; the factories are written to a temporary module per test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from estimator import EstimatorError
from estimator.api import estimate
from estimator.loader import validate_config

torch = pytest.importorskip("torch")

from estimator.families.module import trace_module  # noqa: E402
from estimator.measure import verify as verify_module  # noqa: E402
from estimator.measure.module_build import build_for_real, user_location  # noqa: E402

MODELS = '''
import random

import torch
from torch import nn


class ItemInit(nn.Module):
    """timm's pattern: per-layer rates read with .item(), widths with .tolist(), a Python-side draw."""

    def __init__(self, dim=16, depth=3, rate=0.1):
        super().__init__()
        self.rates = [x.item() for x in torch.linspace(0, rate, depth)]
        widths = torch.tensor([dim] * depth).tolist()
        self.flip = bool(torch.rand(()) < 2.0) and random.random() < 2.0
        self.layers = nn.ModuleList(nn.Linear(w, dim) for w in widths)
        for layer in self.layers:
            nn.init.trunc_normal_(layer.weight, std=0.02)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class TiedItem(nn.Module):
    """A tied embedding, a frozen layer and a plain tensor attribute, built by a constructor using .item()."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.scale = torch.linspace(0, 1, 3)[1].item()  # 0.5
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.mid.requires_grad_(False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.table = torch.ones(vocab, dim)  # not a buffer: kept as an attribute

    def forward(self, idx):
        h = self.emb(idx) * self.scale
        return self.head(torch.tanh(self.mid(h)) + self.table[idx])


def broken(width=4):
    widths = [int(x) for x in torch.arange(width).tolist()]
    raise ValueError(f"no layer for widths {widths}")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y
        return -y
'''


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ctor_models.py"
    path.write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ctor_models", raising=False)  # imported from this test's folder
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def verify_rows(model: dict[str, Any], precision: str = "fp32", optimizer: str = "adam") -> list[Any]:
    cfg = validate_config({"model": model, "training": {"precision": precision}, "optimizer": {"name": optimizer}})
    result = verify_module.run_verify(cfg, "cpu")
    return [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_item_tolist_and_rng_in_the_constructor_trace_exactly(models: Path, precision: str) -> None:
    model = {"module": "ctor_models:ItemInit", "inputs": [{"shape": [4, 16]}]}
    trace = trace_module(validate_config({"model": model}).model, precision)
    assert trace.construction == "real"
    # 3 x (16·16 + 16) parameters, each with a gradient
    assert [(p.name, p.shape, p.trainable) for p in trace.parameters] == [
        (f"layers.{i}.{kind}", shape, True) for i in range(3) for kind, shape in (("weight", (16, 16)),
                                                                                 ("bias", (16,)))]
    assert verify_rows(model, precision) == []  # every figure, both peaks to the byte


def test_tied_frozen_and_attribute_tensors_survive_the_conversion(models: Path) -> None:
    model = {"module": "ctor_models:TiedItem", "inputs": [{"shape": [2, 5], "dtype": "int64", "high": 20}],
             "loss": "cross_entropy"}
    est = estimate(validate_config({"model": model, "optimizer": {"name": "adamw"}}), "cpu")
    trace = trace_module(est.config.model)
    assert trace.construction == "real"
    assert [(p.name, p.trainable) for p in trace.parameters] == [
        ("emb.weight", True), ("mid.weight", False), ("mid.bias", False)]  # the head shares emb.weight
    # the attribute tensor is module state: 20·8 float32 bytes, like a buffer
    assert [e.nbytes for e in est.step.setup if e.name.startswith("module_state#")] == [20 * 8 * 4]
    assert verify_rows(model, "fp32", "adamw") == []


def test_a_module_that_builds_on_fake_tensors_takes_the_fast_path() -> None:
    model = {"module": "estimator.measure.examples:make_mlp", "inputs": [{"shape": [2, 16]}]}
    assert trace_module(validate_config({"model": model}).model).construction == "fake"


def test_a_constructor_error_names_the_users_file_and_line(models: Path) -> None:
    with pytest.raises(EstimatorError) as info:
        estimate(validate_config({"model": {"module": "ctor_models:broken", "inputs": [{"shape": [2]}]}}), "cpu")
    (problem,) = info.value.problems
    where = f"{models}:{line_of(models, 'raise ValueError')}"
    assert problem == f"model.module: ctor_models:broken(**kwargs) raised ValueError: no layer for widths " \
                      f"[0, 1, 2, 3] at {where}"


def test_a_data_dependent_forward_names_the_users_line(models: Path) -> None:
    with pytest.raises(EstimatorError) as info:
        estimate(validate_config({"model": {"module": "ctor_models:Branchy", "inputs": [{"shape": [2, 4]}]}}), "cpu")
    (problem,) = info.value.problems
    assert problem.startswith("model.module: ctor_models:Branchy forward on inputs [[2, 4] float32] depends on "
                              f"tensor values at {models}:{line_of(models, 'if y.sum() > 0')} (")
    assert "\n" not in problem


def test_verify_runs_a_real_only_constructor_too(models: Path) -> None:
    """verify traces first; the constructor that failed on fake tensors no longer stops it."""
    assert verify_rows({"module": "ctor_models:ItemInit", "inputs": [{"shape": [2, 16]}]}, "amp-bf16", "sgd") == []


def test_the_real_construction_is_bounded() -> None:
    def big() -> Any:
        return torch.nn.Linear(1024, 1024)  # 4 MiB of weight

    with pytest.raises(EstimatorError) as info:
        build_for_real(big, "big(**kwargs)", "DataDependentOutputException: ...", limit=1 << 20)
    (problem,) = info.value.problems
    assert problem.startswith("model.module: big(**kwargs) cannot be built on fake tensors "
                              "(DataDependentOutputException: ...), and building it for real on the CPU passed ")
    assert "over the 1,048,576 allowed" in problem
    assert build_for_real(lambda: torch.nn.Linear(4, 4), "small", "", limit=1 << 20).weight.shape == (4, 4)


def test_user_location_skips_torch_and_the_standard_library() -> None:
    def user_code() -> None:
        torch.ones(2).view(3)  # raises inside torch

    try:
        user_code()
    except RuntimeError as exc:
        assert user_location(exc) == f"{__file__}:{user_code.__code__.co_firstlineno + 1}"
