"""Bytes per element of every tensor role, for each training precision.

Conventions (PyTorch semantics):

* ``fp32`` / ``bf16`` / ``fp16``: the model is converted to that dtype (``model.to(dtype)``), so
  parameters, gradients, optimizer state, inputs and activations all use it.
* ``amp-bf16`` / ``amp-fp16``: ``torch.autocast`` mixed precision (Micikevicius et al. 2018,
  "Mixed Precision Training"): parameters, gradients and optimizer state stay fp32; matmul outputs
  (activations) are 16-bit, and autocast caches a 16-bit copy of each weight during forward.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int64": 8}


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtype of each role under one precision setting."""

    name: str
    parameter_dtype: str
    activation_dtype: str
    autocast: bool

    @property
    def parameter_bytes(self) -> int:
        return DTYPE_BYTES[self.parameter_dtype]

    @property
    def gradient_bytes(self) -> int:
        """Gradients take the parameter's dtype (torch's AccumulateGrad casts to it)."""
        return DTYPE_BYTES[self.parameter_dtype]

    @property
    def state_bytes(self) -> int:
        """Optimizer state takes the parameter's dtype (``torch.zeros_like(param)``)."""
        return DTYPE_BYTES[self.parameter_dtype]

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


def precision_plan(name: str) -> PrecisionPlan:
    """The plan for a validated precision name."""
    return PRECISIONS[name]
