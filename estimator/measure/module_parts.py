"""``verify`` for the module family: the real step that the meta-device trace stands for.

Everything is shared with the trace (``module_trace.py``) so both run the same step: the factory
call (``device=`` passed when the factory takes it), the dtype conversion (``model.to(dtype)``),
the batch (the trace's resolved input and target specs) and the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from estimator.config import Config
from estimator.errors import EstimatorError
from estimator.families.module import ModuleConfig, trace_module
from estimator.measure.models import StepParts
from estimator.measure.module_trace import build_module, load_factory, make_tensor, module_loss


def module_step_parts(
    config: Config, device: torch.device, dtype: torch.dtype, autocast: torch.dtype | None
) -> StepParts:
    """Build/batch/loss of the configured module for ``measure_training_step`` on ``device``.

    ``dtype`` is the parameter dtype (fp32 under autocast), ``autocast`` the autocast dtype or None.
    """
    model = config.model
    if not isinstance(model, ModuleConfig):
        raise EstimatorError(f"model.family: module_step_parts needs the module family, not {model.family!r}")
    trace = trace_module(model, config.training.precision)  # the resolved batch, and any trace error first
    factory = load_factory(model)

    def build() -> nn.Module:
        return build_module(factory, model, device).to(device=device, dtype=dtype)

    def make_batch() -> tuple[tuple[Tensor, ...], Tensor]:
        inputs = tuple(make_tensor(spec, device) for spec in trace.inputs)
        target = make_tensor(trace.target, device) if trace.target is not None else torch.empty(0, device=device)
        return inputs, target

    return StepParts(build, make_batch, module_loss(model.loss), autocast)
