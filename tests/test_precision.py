"""Bytes per parameter and per activation under each precision, derived by hand."""

from __future__ import annotations

import pytest

from estimator import estimate, load_config

P, ACT = 36, 16  # the seed's parameters and activation elements


def memory(precision: str, optimizer: str) -> dict[str, int]:
    overrides = [f"training.precision={precision}", f"optimizer.name={optimizer}"]
    return estimate(load_config(overrides=overrides), device="cpu").to_json()["memory"]


@pytest.mark.parametrize(
    ("precision", "optimizer", "per_param", "act_bytes"),
    [
        ("fp32", "adam", 16, 4),  # 4 param + 4 grad + 8 (m, v)
        ("fp32", "sgd", 8, 4),
        ("fp32", "adagrad", 12, 4),
        ("bf16", "adam", 8, 2),  # everything 2 bytes
        ("fp16", "adamw", 8, 2),
        ("bf16", "momentum", 6, 2),
        ("amp-bf16", "adam", 16, 2),  # fp32 params, grads, state; 16-bit activations
        ("amp-fp16", "sgd", 8, 2),
    ],
)
def test_bytes_per_parameter(precision: str, optimizer: str, per_param: int, act_bytes: int) -> None:
    m = memory(precision, optimizer)
    assert m["parameters"] + m["gradients"] + m["optimizer_state"] == per_param * P
    assert m["activations"] == act_bytes * ACT


def test_unknown_precision_is_rejected() -> None:
    from estimator import EstimatorError

    with pytest.raises(EstimatorError, match="training.precision"):
        load_config(overrides=["training.precision=fp8"])
