"""What a model family must tell the estimator, and the registry that holds the families.

A family is plain arithmetic over its pydantic config: which parameter tensors exist, how many
activation elements the seed's first-order formula counts, the FLOPs of one training step, and the
allocation events of forward and backward for the timeline (``timeline.py``). No torch here.
Registry pattern after ``torch.utils.flop_counter``: a decorator that refuses duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import Any, NamedTuple, Protocol

from estimator.events import Event


class ParamTensor(NamedTuple):
    """One parameter tensor: its name, shape, and whether the optimizer trains it.

    A named tuple, not a dataclass: a 100,000-layer model makes 100,000 of them, five times faster."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one training step (2 FLOPs per multiply-add, the FlopCounterMode convention).

    ``forward``/``backward`` follow the seed's 6·B·P rule (2·B·P forward, 4·B·P backward, with B
    the number of tokens or samples); ``matmul`` is the exact matmul count of the project's own torch
    implementation (forward + backward), what ``torch.utils.flop_counter.FlopCounterMode`` reports;
    ``attention`` is the extra attention term (PaLM appendix B) where the family has one;
    ``optimizer_matmul`` the matmuls of ``optimizer.step()``, which FlopCounterMode counts too.
    """

    forward: int
    backward: int
    matmul: int
    matmul_forward: int
    attention: int = 0
    optimizer_matmul: int = 0  # matmuls inside optimizer.step() (Adafactor), included in ``matmul``
    tokens: int = 0  # B (samples) or T (tokens) of the 6·B·P / 6·N·T rule, as used above
    rule_parameters: int = 0  # P or N of the rule, as used above (e.g. without embedding lookups)

    @property
    def per_step(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class BatchInForce:
    """The batch a step really uses, and where each figure comes from (shown in the header)."""

    batch_size: int  # samples (sequences) per step
    seq_len: int | None  # tokens per sequence for sequence models, resolved; None otherwise
    batch_source: str  # e.g. "training.batch_size" or "model.inputs[0].shape[0]"
    seq_source: str | None = None  # e.g. "training.seq_len" or "model.max_seq_len"


@dataclass(frozen=True)
class StepShape:
    """The dtype sizes a family needs to emit events (from the precision plan)."""

    activation_bytes: int  # bytes per activation element (16-bit under autocast)
    parameter_bytes: int  # bytes per parameter element
    gradient_bytes: int
    autocast: bool  # True: 16-bit copies of the weights are made (and cached) in forward


class ModelFamily(Protocol):
    """The interface every family implements (see ``families/mlp.py`` for the reference one)."""

    name: str

    def parameters(self, model: Any) -> list[ParamTensor]: ...

    def activation_elements(self, model: Any, batch: Any) -> int: ...

    def activation_bytes(self, model: Any, batch: Any, shape: StepShape) -> int: ...

    def batch_in_force(self, model: Any, batch: Any) -> BatchInForce: ...

    def flops(self, model: Any, batch: Any) -> FlopCount: ...

    def input_events(self, model: Any, batch: Any, shape: StepShape) -> list[Event]: ...

    def forward_backward_events(self, model: Any, batch: Any, shape: StepShape) -> list[Event]: ...

    def end_of_step_events(self, model: Any, batch: Any, shape: StepShape) -> list[Event]: ...


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: instantiate the family and register it under ``name`` (once)."""

    def wrap(cls: type) -> type:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered")
        instance = cls()
        instance.name = name
        _FAMILIES[name] = instance
        return cls

    return wrap


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name`` (the config layer has already validated it)."""
    return _FAMILIES[name]


def family_names() -> list[str]:
    return sorted(_FAMILIES)
