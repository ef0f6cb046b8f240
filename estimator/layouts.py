"""Mixed-precision layouts: the bytes each keeps per parameter, and the events of an fp32 master copy.

Three layouts (docs/precision.md has the table and the sources):

* **autocast** (``amp-bf16``/``amp-fp16``): fp32 weights, gradients and optimizer state; 16-bit matmul
  outputs; a 16-bit copy of each weight cached during forward (Micikevicius et al. 2018).
* **pure 16-bit** (``bf16``/``fp16``): everything in the 16-bit dtype, optimizer state included.
* **16-bit + fp32 master** (``bf16``/``fp16`` with ``training.master_weights``): 16-bit weights and
  gradients, an fp32 master copy that the optimizer steps, its state in fp32 (ZeRO, Rajbhandari et al.
  2020, section 3.1: 2 + 2 + 12 bytes per parameter with Adam; Megatron-LM's
  ``Float16OptimizerWithFloat16Params``; DeepSpeed's bf16/fp16 optimizers). On one device, DDP and
  ZeRO-1/2 the master copy is optimizer state, partitioned like it; under zero3/fsdp the layout is FSDP2's
  ``MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=parallel.reduce_dtype)``: the fp32 shards are
  the master copy, all-gathered and computed in 16 bits (Zhao et al. 2023, section 4.4), no extra copy.

The step with a master copy (Megatron's order): every 16-bit gradient is copied into an fp32 gradient
of its master (``master.grad = param.grad.float()``), the optimizer steps the masters, the masters are
copied back into the 16-bit weights in place (no allocation), and ``zero_grad`` drops the 16-bit
gradients, then the fp32 ones.
"""

from __future__ import annotations

from typing import Any

from estimator.events import Event, alloc, free
from estimator.families.base import ParamTensor

SHARDED_STRATEGIES = ("zero3", "fsdp")
"""Strategies whose fp32 shards are themselves the master copy (FSDP2 MixedPrecisionPolicy)."""


def master_weights(config: Any) -> bool:
    """Whether the step keeps fp32 master weights at all (``training.master_weights``)."""
    return bool(getattr(config.training, "master_weights", False))


def separate_master_copy(config: Any, strategy: str | None = None) -> bool:
    """Whether the master copy is a tensor of its own (optimizer state), not the sharded parameters."""
    return master_weights(config) and (strategy or "none") not in SHARDED_STRATEGIES


def master_copy_bytes(params: list[ParamTensor]) -> int:
    """fp32 bytes of the master copy of ``params`` (trainable ones)."""
    return 4 * sum(p.numel for p in params if p.trainable)


def master_setup_events(params: list[ParamTensor], phase: str = "setup") -> list[Event]:
    """The fp32 master copy, made when the optimizer is built (``param.detach().float()``)."""
    return [alloc(f"{p.name}.master", "optimizer_state", 4 * p.numel, phase) for p in params if p.trainable]


def master_grad_events(params: list[ParamTensor]) -> list[Event]:
    """``master.grad = param.grad.float()`` for every parameter, before the optimizer steps."""
    return [alloc(f"{p.name}.master.grad", "gradient", 4 * p.numel, "optimizer_step")
            for p in params if p.trainable]


def master_grad_free_events(params: list[ParamTensor]) -> list[Event]:
    """``zero_grad(set_to_none=True)`` of the masters, after that of the 16-bit weights."""
    return [free(f"{p.name}.master.grad", "gradient", 4 * p.numel, "zero_grad") for p in params if p.trainable]


def bytes_per_parameter(precision: str, master: bool, optimizer_state_elements: float) -> dict[str, float]:
    """Bytes per parameter of each model state on one device: the layouts table of docs/precision.md.

    ``optimizer_state_elements`` is the optimizer's state tensors per parameter (Adam: 2).
    """
    from estimator.precision import precision_plan

    plan = precision_plan(precision, master)
    return {"parameters": plan.parameter_bytes, "gradients": plan.gradient_bytes,
            "optimizer_state": plan.master_bytes + optimizer_state_elements * plan.state_bytes}
