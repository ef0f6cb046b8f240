"""Optimizer state per parameter, from the registry, against counts derived by hand."""

from __future__ import annotations

import pytest

from estimator import estimate, load_config
from estimator.families.base import ParamTensor
from estimator.optimizers import get_optimizer, optimizer_names, register_optimizer

P = 36  # the seed's Cruncher: 2 layers of 4x4 + a 4x1 head


def state_bytes(*overrides: str) -> int:
    return estimate(load_config(overrides=list(overrides)), device="cpu").memory.optimizer_state


@pytest.mark.parametrize(
    ("overrides", "copies"),
    [
        (["optimizer.name=sgd"], 0),
        (["optimizer.name=sgd", "optimizer.momentum=0.9"], 1),
        (["optimizer.name=momentum"], 1),
        (["optimizer.name=momentum", "optimizer.nesterov=true"], 1),
        (["optimizer.name=adagrad"], 1),
        (["optimizer.name=rmsprop"], 1),
        (["optimizer.name=rmsprop", "optimizer.momentum=0.9"], 2),
        (["optimizer.name=rmsprop", "optimizer.centered=true"], 2),
        (["optimizer.name=rmsprop", "optimizer.momentum=0.9", "optimizer.centered=true"], 3),
        (["optimizer.name=adam"], 2),
        (["optimizer.name=adam", "optimizer.amsgrad=true"], 3),
        (["optimizer.name=adamw"], 2),
        (["optimizer.name=adamw", "optimizer.amsgrad=true"], 3),
        (["optimizer.name=lion"], 1),
    ],
)
def test_state_copies_per_parameter(overrides: list[str], copies: int) -> None:
    assert state_bytes(*overrides) == copies * P * 4


def test_adafactor_factors_matrices() -> None:
    # 4x4 layers: row_var 4 + col_var 4 each; the 4x1 head: row_var 4 + col_var 1
    assert state_bytes("optimizer.name=adafactor") == (2 * (4 + 4) + (4 + 1)) * 4
    spec = get_optimizer("adafactor")
    states = spec.state_tensors(ParamTensor("w", (4096, 11008)), None)
    assert [(s.name, s.numel) for s in states] == [("row_var", 4096), ("col_var", 11008)]
    assert [s.numel for s in spec.state_tensors(ParamTensor("b", (4096,)), None)] == [4096]


def test_adam8bit_blockwise_state() -> None:
    spec = get_optimizer("adam8bit")
    # 4096 x 4096: two 1-byte codes per element + two fp32 absmax per 256-element block
    states = spec.state_tensors(ParamTensor("w", (4096, 4096)), None)
    n = 4096 * 4096
    assert sum(s.numel * (1 if s.dtype == "int8" else 4) for s in states) == 2 * n + 2 * 4 * (n // 256)
    # bitsandbytes keeps fp32 state for tensors under 4096 elements: the whole seed model
    assert state_bytes("optimizer.name=adam8bit") == 2 * P * 4
    # a tensor of 4097 elements needs 17 blocks (ceil)
    odd = spec.state_tensors(ParamTensor("v", (4097,)), None)
    assert [s.numel for s in odd if s.name.startswith("absmax")] == [17, 17]


def test_step_tensors_follow_torch() -> None:
    def step(name: str) -> int:
        return estimate(load_config(overrides=[f"optimizer.name={name}"]), device="cpu").memory.optimizer_step_tensors

    assert step("sgd") == 0 and step("momentum") == 0
    for name in ("adagrad", "rmsprop", "adam", "adamw", "adafactor"):
        assert step(name) == 3 * 4, name  # three parameter tensors, one float32 scalar each


def test_every_optimizer_documents_its_source() -> None:
    for name in optimizer_names():
        spec = get_optimizer(name)
        assert spec.source and spec.update_rule and spec.title, name
    assert "Duchi" in get_optimizer("adagrad").source
    assert "Kingma" in get_optimizer("adam").source
    assert "Loshchilov" in get_optimizer("adamw").source


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("adam", title="x", update_rule="x", source="x", torch_class=None, step_tensor=False)(
            lambda p, o: []
        )
