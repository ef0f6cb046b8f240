"""FlopCounterMode formulas for the CPU attention kernel, and a one-step FLOP counter.

``torch.utils.flop_counter`` counts the CUDA SDPA kernels (flash, memory-efficient, cuDNN) with
``sdpa_flop``/``sdpa_backward_flop`` but has no entry for
``aten._scaled_dot_product_flash_attention_for_cpu``, so on the CPU an SDPA model reports 0
attention FLOPs. :func:`register_sdpa_flops` registers the same formulas for the CPU kernel and
its backward: forward 4·B·H·S_q·S_k·h (QKᵀ and P·V, causal mask not discounted), backward
10·B·H·S_q·S_k·h (torch's count, which includes recomputing QKᵀ as flash backward does).
It has no entry for ``aten._grouped_mm`` (transformers' default MoE experts) either: registered
here with 2 FLOPs per multiply-add.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _cpu_sdpa_flop(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """``sdpa_flop`` for the CPU flash kernel (same arguments up to ``is_causal``)."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape: Any,
    query_shape: Any,
    key_shape: Any,
    value_shape: Any,
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """``sdpa_backward_flop`` for the CPU flash kernel's backward."""
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm_flop(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``aten._grouped_mm`` (MoE experts; its backward calls it too), which FlopCounterMode leaves at 0:
    2 FLOPs per multiply-add, each row (or column block) multiplied by its group's matrix only.

    (m, k) x (g, k, n): 2·m·k·n; (m, k) x (k, n) grouped over k (a weight gradient): 2·m·k·n;
    (g, m, k) x (k, n): 2·m·k·n; (g, m, k) x (g, k, n): 2·g·m·k·n.
    """
    if len(a_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]
    if len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
    _aten._grouped_mm: _grouped_mm_flop,
}


def register_sdpa_flops() -> None:
    """Make FlopCounterMode count the CPU SDPA kernel; idempotent, affects counters created later."""
    for op, formula in _FORMULAS.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


@dataclass(frozen=True)
class StepFlops:
    """FlopCounterMode totals of one training step, split where the step is split."""

    forward: int
    backward: int  # includes the recomputation of checkpointed blocks
    by_op: dict[str, int]

    @property
    def total(self) -> int:
        return self.forward + self.backward


def count_step_flops(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> StepFlops:
    """Run forward (loss) and backward under FlopCounterMode; gradients are left on the model."""
    register_sdpa_flops()
    with FlopCounterMode(display=False) as fwd:
        loss = model(idx, targets)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    by_op: dict[str, int] = {}
    for counter in (fwd, bwd):
        for op, n in counter.get_flop_counts().get("Global", {}).items():
            by_op[str(op)] = by_op.get(str(op), 0) + n
    return StepFlops(fwd.get_total_flops(), bwd.get_total_flops(), by_op)
