"""Any ``torch.nn.Module`` as a model: one training step traced without running it.

The config names a factory (``package.module:callable``) and the shapes of its inputs. Instead of
formulas, the family *traces* forward, loss and backward once on fake tensors -- tensors backed by
the meta device (no data, no memory) that report the CPU as their device, so that autocast and
kernel choices (SDPA) are the CPU's -- under the live-tensor tracker, and turns what it saw into the
same events the analytic families emit (``estimator/measure/module_trace.py``; docs/module.md).

This file is the pure-Python half (config, cache, family): ``import estimator`` never imports torch;
the first family call that needs the trace imports the torch side.

Roles of the traced storages: parameters and their buffers -> ``parameter`` (setup); inputs and
target -> ``input`` (setup); storages autograd saves for backward (``saved_tensors_hooks``) ->
``activation``; each parameter's ``.grad`` storage -> ``gradient`` (named ``{param}.grad``, freed by
``zero_grad`` in ``simulate.py``); everything else -> ``temporary``.

Batch size: the inputs' shapes are the batch; ``training.batch_size`` is not used. In the 6·B·P
FLOP rule B is the number of target elements for ``cross_entropy`` (tokens, for a language model),
else ``inputs[0].shape[0]``; P counts every parameter the forward reads, trainable or frozen,
except through embedding-style lookups (Kaplan et al. 2020 leave embeddings out).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from estimator.config import StrictModel, TrainingConfig
from estimator.errors import EstimatorError
from estimator.events import Event, alloc
from estimator.families.base import BatchInForce, FlopCount, ParamTensor, StepShape, register_family
from estimator.precision import precision_plan

InputDtype = Literal["float32", "bfloat16", "float16", "int64", "int32", "bool"]
DTYPE_SIZES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1}
INTEGER_DTYPES = ("int64", "int32")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
#: the dtype of the model's floating tensors (and float32 inputs) under each precision
DATA_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                               "amp-bf16": "float32", "amp-fp16": "float32"}
AUTOCAST_DTYPES: dict[str, str] = {"amp-bf16": "bfloat16", "amp-fp16": "float16"}

_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class InputSpec(StrictModel):
    """One tensor given to the model (or the loss): its shape, dtype, and value range for integers."""

    shape: list[Annotated[int, Field(gt=0)]] = Field(description="the tensor's shape, batch dimension included")
    dtype: InputDtype = Field(
        "float32", description="float32 | bfloat16 | float16 | int64 | int32 | bool (float32 follows the precision)"
    )
    high: int | None = Field(
        None, gt=0, description="integer inputs: values are drawn from [0, high), e.g. the vocabulary size"
    )

    @model_validator(mode="after")
    def _high_for_integers(self) -> InputSpec:
        if self.dtype in INTEGER_DTYPES and self.high is None:
            raise ValueError(f"an {self.dtype} input needs high (values are drawn from [0, high), "
                             "e.g. the vocabulary size)")
        if self.dtype not in INTEGER_DTYPES and self.high is not None:
            raise ValueError(f"high applies to integer inputs only, not to {self.dtype}")
        return self


class ModuleConfig(StrictModel):
    """Your own ``nn.Module``, built by a factory and traced (docs/module.md)."""

    family: Literal["module"] = "module"
    module: str = Field(description="'package.module:factory', a callable that returns the torch.nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    inputs: list[InputSpec] = Field(
        min_length=1, description="the positional inputs of forward(), in order; their shapes are the batch"
    )
    target: InputSpec | None = Field(
        None,
        description="the loss target; null = mse: the output's shape | cross_entropy: int64 class ids, "
        "the output's shape without its last (class) dimension",
    )
    loss: Literal["mse", "cross_entropy", "sum"] = Field(
        "mse", description="mse (F.mse_loss) | cross_entropy (over the last dimension) | sum (output.sum())"
    )
    search_dir: str | None = Field(
        None, description="where `module` is looked for after installed packages, before the current directory; "
        "relative to the config file (like hf_config), which is the default"
    )

    @field_validator("module")
    @classmethod
    def _module_path(cls, value: str) -> str:
        text = value.strip()
        if not _MODULE_PATH.match(text):
            raise ValueError(f"expected 'package.module:factory' (an importable module, a colon, a callable "
                             f"that returns the nn.Module), got {value!r}")
        return text

    @field_validator("kwargs")
    @classmethod
    def _no_device(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "device" in value:
            raise ValueError("'device' is passed by estimator (the meta trace, or the verify device); remove it")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be plain JSON/YAML values ({exc})") from None
        return value

    @model_validator(mode="after")
    def _target_fits_loss(self) -> ModuleConfig:
        if self.loss == "sum" and self.target is not None:
            raise ValueError("loss 'sum' takes no target; remove model.target")
        return self


def with_search_dir(section: dict[str, Any], source_dir: Path) -> dict[str, Any]:
    """The module section with ``search_dir`` resolved against the config file's directory (the default),
    as ``hf_config`` is: a factory file next to the config is found from any current directory."""
    given = section.get("search_dir")
    if given is not None and not isinstance(given, str):
        return section  # validation reports the type
    folder = source_dir if given is None else Path(given).expanduser()
    return {**section, "search_dir": str(folder if folder.is_absolute() else (source_dir / folder).resolve())}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the trace actually made: the input spec with its dtype resolved for the precision."""

    shape: tuple[int, ...]
    dtype: str
    high: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class ModuleTrace:
    """What one traced training step showed, as plain Python (no torch objects are kept)."""

    precision: str
    parameters: tuple[ParamTensor, ...]  # named_parameters() order; trainable = got a gradient
    inputs: tuple[TensorSpec, ...]
    target: TensorSpec | None  # None for loss 'sum'
    state_events: tuple[Event, ...]  # buffers and other tensors the module holds (role parameter, setup)
    step_events: tuple[Event, ...]  # forward, loss, backward
    end_events: tuple[Event, ...]  # the output and loss (and anything else left) dropped at the end
    forward_saved_bytes: int  # the forward's saved tensors, without casts of parameters/inputs
    flop_tokens: int  # B of the 6·B·P rule
    flop_parameters: int  # P of the 6·B·P rule
    matmul_forward: int  # FlopCounterMode, forward + loss
    matmul: int  # FlopCounterMode, the whole step (forward + loss + backward)
    seconds: float  # wall time of the trace
    construction: str = "fake"  # "fake": built on fake tensors | "real": built on the CPU, then converted
    # traced with FSDP2's hooks (zero3/fsdp): (step event index, hook, unit) where each hook ran, each
    # parameter's unit ("root" or a submodule path) and the unit class(es) chosen (docs/module.md)
    fsdp_marks: tuple[tuple[int, str, str], ...] = ()
    fsdp_units: tuple[tuple[str, str], ...] = ()
    fsdp_classes: tuple[str, ...] = ()


def resolve_spec(spec: InputSpec, precision: str) -> TensorSpec:
    """float32 tensors take the precision's data dtype (bf16/fp16 under pure 16-bit training)."""
    dtype = DATA_DTYPES[precision] if spec.dtype == "float32" else spec.dtype
    return TensorSpec(tuple(spec.shape), dtype, spec.high)


def trace_module(model: ModuleConfig, precision: str = "fp32") -> ModuleTrace:
    """The traced step of ``model`` under ``precision``, computed once per config (cached)."""
    return _trace_cached(model.model_dump_json(), precision)


@functools.lru_cache(maxsize=16)
def _trace_cached(model_json: str, precision: str) -> ModuleTrace:
    try:
        from estimator.measure.module_trace import run_trace
    except ImportError as exc:
        raise EstimatorError(f"model.module: tracing a module needs torch ({exc}); "
                             "pip install 'estimator[torch]'") from None
    trace = run_trace(ModuleConfig.model_validate_json(model_json), precision)
    _PARAMETERS[model_json] = trace.parameters
    return trace


_PARAMETERS: dict[str, tuple[ParamTensor, ...]] = {}  # parameters do not depend on the precision


def trace_input_events(t: ModuleTrace) -> list[Event]:
    """A trace's setup besides the parameters: the module's buffers (role parameter), each input, the target."""
    events = list(t.state_events)
    events += [alloc(f"inputs.{i}", "input", s.nbytes, "setup") for i, s in enumerate(t.inputs)]
    if t.target is not None and t.target.nbytes:
        events.append(alloc("target", "input", t.target.nbytes, "setup"))
    return events


def trace_module_fsdp(model: ModuleConfig, precision: str, unit_classes: tuple[str, ...] | None,
                      policy: bool = False) -> ModuleTrace:
    """The traced step of ``model`` with FSDP2's hooks on the units and the root, where they ran (cached);
    ``policy``: under FSDP2's MixedPrecisionPolicy (buffers stay fp32)."""
    return _fsdp_trace_cached(model.model_dump_json(), precision, unit_classes, policy)


@functools.lru_cache(maxsize=16)
def _fsdp_trace_cached(model_json: str, precision: str, unit_classes: tuple[str, ...] | None,
                       policy: bool = False) -> ModuleTrace:
    try:
        from estimator.measure.module_trace import run_trace
    except ImportError as exc:
        raise EstimatorError(f"model.module: tracing a module needs torch ({exc}); "
                             "pip install 'estimator[torch]'") from None
    return run_trace(ModuleConfig.model_validate_json(model_json), precision, fsdp=True, unit_classes=unit_classes,
                     policy=policy)


def _check_training(batch: TrainingConfig) -> None:
    """Refuse training options the module family cannot honour, instead of ignoring them."""
    if batch.activation_checkpointing != "none":
        raise EstimatorError("training.activation_checkpointing: not applied to model.module; use "
                             "torch.utils.checkpoint inside your module's forward (the trace follows it)")
    if batch.seq_len is not None:
        raise EstimatorError("training.seq_len: the module family takes sequence lengths from model.inputs shapes")


@register_family("module")
class ModuleFamily:
    """Any nn.Module: parameters, activations, FLOPs and events read off a meta-device trace."""

    name = "module"
    #: what ``memory.activations`` counts, in the words of the explanations
    activation_description = ("what the traced step saves for backward (saved_tensors_hooks): the forward's "
                              "saved tensors, autocast's casts and the loss's input")

    def trace(self, model: ModuleConfig, batch: TrainingConfig) -> ModuleTrace:
        _check_training(batch)
        return trace_module(model, batch.precision)

    def parameters(self, model: ModuleConfig) -> list[ParamTensor]:
        """``named_parameters()``; frozen ones (and any that get no gradient) are not trainable.

        Parameters do not depend on the precision, so any cached trace answers; the first call
        traces the fp32 step (a second trace follows for another precision).
        """
        key = model.model_dump_json()
        if key not in _PARAMETERS:
            trace_module(model, "fp32")
        return list(_PARAMETERS[key])

    def activation_elements(self, model: ModuleConfig, batch: TrainingConfig) -> int:
        """:meth:`activation_bytes` in elements of the activation dtype (mixed dtypes: bytes, rounded up)."""
        shape_bytes = precision_plan(batch.precision).activation_bytes
        return -(-self.saved_bytes(model, batch) // shape_bytes)

    def activation_bytes(self, model: ModuleConfig, batch: TrainingConfig, shape: StepShape) -> int:
        """Bytes the traced step saves for backward, each storage at its real dtype and counted once.

        Everything ``saved_tensors_hooks`` saw in forward and loss: the forward's saved tensors, the
        16-bit casts of weights and inputs under autocast, and the loss's saved input. This is the
        ``memory.activations`` figure and equals ``saved_activations`` (the same events).
        """
        return self.saved_bytes(model, batch)

    def saved_bytes(self, model: ModuleConfig, batch: TrainingConfig) -> int:
        """Sum of the trace's activation allocations in forward and loss (what autograd keeps)."""
        return sum(e.nbytes for e in self.trace(model, batch).step_events
                   if e.nbytes > 0 and e.role == "activation" and e.phase in ("forward", "loss"))

    def batch_in_force(self, model: ModuleConfig, batch: TrainingConfig) -> BatchInForce:
        """The batch is the first input's leading dimension; ``training.batch_size`` is not used."""
        return BatchInForce(model.inputs[0].shape[0], None, "model.inputs[0].shape[0]")

    def flops(self, model: ModuleConfig, batch: TrainingConfig) -> FlopCount:
        """6·B·P (forward 2·B·P, backward 4·B·P) and FlopCounterMode's count of the traced step.

        With frozen weights the real backward is smaller than 4·B·P (no weight gradients for them):
        ``matmul - matmul_forward`` is the measured backward.
        """
        t = self.trace(model, batch)
        work = t.flop_tokens * t.flop_parameters
        return FlopCount(forward=2 * work, backward=4 * work, matmul=t.matmul, matmul_forward=t.matmul_forward,
                         tokens=t.flop_tokens, rule_parameters=t.flop_parameters)

    def input_events(self, model: ModuleConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """The module's buffers (role parameter), then each input and the target."""
        return trace_input_events(self.trace(model, batch))

    def forward_backward_events(self, model: ModuleConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """Every allocation and release the traced forward, loss and backward made, in order."""
        return list(self.trace(model, batch).step_events)

    def end_of_step_events(self, model: ModuleConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """The output and the loss, held by the training loop until the step is over."""
        return list(self.trace(model, batch).end_events)
