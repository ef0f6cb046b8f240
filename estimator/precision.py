"""Bytes per element of every tensor role, for each training precision.

Conventions (PyTorch semantics):

* ``fp32`` / ``bf16`` / ``fp16``: the model is converted to that dtype (``model.to(dtype)``), so
  parameters, gradients, optimizer state, inputs and activations all use it.
* ``amp-bf16`` / ``amp-fp16``: ``torch.autocast`` mixed precision (Micikevicius et al. 2018,
  "Mixed Precision Training"): parameters, gradients and optimizer state stay fp32; matmul outputs
  (activations) are 16-bit, and autocast caches a 16-bit copy of each weight during forward.
* ``bf16`` / ``fp16`` with ``training.master_weights``: 16-bit weights, gradients and compute, and an
  fp32 master copy that the optimizer updates, its state in fp32 too (Micikevicius et al. 2018,
  section 3.1; the ZeRO paper's 2 + 2 + 12 bytes per parameter for Adam, Rajbhandari et al. 2020,
  section 3.1). Under zero3/fsdp the fp32 shards are the master copy (FSDP2's MixedPrecisionPolicy):
  see :mod:`estimator.layouts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int64": 8}


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtype of each role under one precision setting."""

    name: str
    parameter_dtype: str
    activation_dtype: str
    autocast: bool
    master: bool = False  # an fp32 master copy is what the optimizer steps (training.master_weights)

    @property
    def parameter_bytes(self) -> int:
        return DTYPE_BYTES[self.parameter_dtype]

    @property
    def gradient_bytes(self) -> int:
        """Gradients take the parameter's dtype (torch's AccumulateGrad casts to it)."""
        return DTYPE_BYTES[self.parameter_dtype]

    @property
    def state_bytes(self) -> int:
        """Optimizer state takes the dtype of what it steps (``torch.zeros_like(param)``): fp32 for a master copy."""
        return 4 if self.master else DTYPE_BYTES[self.parameter_dtype]

    @property
    def master_bytes(self) -> int:
        """Bytes per element of the fp32 master copy (0 without one)."""
        return 4 if self.master else 0

    @property
    def activation_bytes(self) -> int:
        return DTYPE_BYTES[self.activation_dtype]


PRECISIONS: dict[str, PrecisionPlan] = {
    "fp32": PrecisionPlan("fp32", "fp32", "fp32", autocast=False),
    "bf16": PrecisionPlan("bf16", "bf16", "bf16", autocast=False),
    "fp16": PrecisionPlan("fp16", "fp16", "fp16", autocast=False),
    "amp-bf16": PrecisionPlan("amp-bf16", "fp32", "bf16", autocast=True),
    "amp-fp16": PrecisionPlan("amp-fp16", "fp32", "fp16", autocast=True),
}


def precision_plan(name: str, master: bool = False) -> PrecisionPlan:
    """The plan for a validated precision name (``master``: training.master_weights, 16-bit names only)."""
    plan = PRECISIONS[name]
    if master:
        if plan.autocast or plan.parameter_dtype == "fp32":
            raise ValueError(f"training.master_weights: applies to bf16 and fp16, not {name!r}")
        return PrecisionPlan(plan.name, plan.parameter_dtype, plan.activation_dtype, plan.autocast, master=True)
    return plan


def training_plan(training: Any) -> PrecisionPlan:
    """The plan of a TrainingConfig: its precision and whether it keeps fp32 master weights."""
    return precision_plan(training.precision, bool(getattr(training, "master_weights", False)))
