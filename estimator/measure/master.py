"""fp32 master weights over a 16-bit model, as Megatron-LM's ``Float16OptimizerWithFloat16Params`` runs them.

The model is built in bf16/fp16; the optimizer is built over fp32 copies of its trainable parameters
(made at construction, ``param.detach().float()``). A step copies every 16-bit gradient into the fp32
gradient of its master (``master.grad = param.grad.float()``), steps the masters, and copies them back
into the 16-bit weights in place; ``zero_grad`` drops the 16-bit gradients, then the fp32 ones. This is
the order :mod:`estimator.layouts` models; ``verify`` measures it with the same tracker as any step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


class MasterWeightsOptimizer:
    """A torch optimizer stepping fp32 masters of 16-bit parameters (the masters count as its state)."""

    def __init__(self, params: Iterable[nn.Parameter], make_inner: Callable[[list[Tensor]], Any]) -> None:
        self.params = list(params)
        self.masters = [p.detach().float().requires_grad_(True) for p in self.params]
        self.inner = make_inner(self.masters)

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        """The inner optimizer's state, each master with it (what ``verify`` reports as optimizer state)."""
        return {m: {**self.inner.state.get(m, {}), "master": m} for m in self.masters}

    @torch.no_grad()
    def step(self) -> None:
        for m, p in zip(self.masters, self.params, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for m, p in zip(self.masters, self.params, strict=True):
            p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)


def with_master_weights(make: Callable[[Iterable[nn.Parameter]], Any]) -> Callable[[Iterable[nn.Parameter]], Any]:
    """Wrap an optimizer factory so that it steps fp32 masters of the parameters it is given."""
    return lambda params: MasterWeightsOptimizer(params, make)
