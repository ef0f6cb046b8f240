"""The CPU allocator's records (torch.profiler, no dispatch mode): what ATen ops return, and the rest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from estimator.measure.allocator import PhaseMarks, profile_allocations
from estimator.measure.mlp import build_cruncher
from estimator.measure.step import measure_training_step


def _phase(trace, label: str) -> tuple[int, int]:  # noqa: ANN001
    """(tensor bytes, all allocator bytes) live at the end of ``label``."""
    last = trace.within(label)[-1]
    return last.tensors, last.total


def test_op_outputs_and_the_rest() -> None:
    keep: list[torch.Tensor] = []
    x = torch.randn(4, 4, requires_grad=True)

    def body(marks: PhaseMarks) -> None:
        marks("lifted")
        keep.append(torch.tensor([1.0, 2.0]))  # torch.tensor's block is returned by aten::lift_fresh: 8 B
        marks("scalar")
        keep.append(x * 0.5)  # 64 B output; Python wraps 0.5 in a 0-d float64 (8 B) that MulBackward keeps
        marks("checkpoint")
        # non-reentrant checkpoint stashes torch.get_rng_state() (5,056 B, no op returns it) for the recompute
        keep.append(checkpoint(torch.sin, x, use_reentrant=False))  # 64 B output
        marks("internal")
        keep.append(F.mse_loss(x, torch.zeros(4, 4)))  # scalars and a buffer made and freed inside the op

    trace = profile_allocations(body)
    assert _phase(trace, "lifted") == (8, 8)
    assert _phase(trace, "scalar") == (8 + 64, 8 + 64 + 8)
    tensors, total = _phase(trace, "checkpoint")
    assert (tensors, total - tensors) == (8 + 64 + 64, 8 + 5056)
    internal = trace.within("internal")
    assert max(s.internal for s in internal) > internal[-1].internal  # op-internal blocks come and go
    keep.clear()


def test_seed_step_uninstrumented_equals_the_tracker() -> None:
    """No parameter is reused, so the tracker's dispatch mode changes nothing: the same curve."""
    torch.manual_seed(0)
    m = measure_training_step(lambda: build_cruncher(4, 2), lambda: ((torch.randn(2, 4),), torch.tensor([4.0, 5.0])),
                              F.mse_loss, lambda p: torch.optim.Adagrad(p, lr=0.01), "cpu", uninstrumented=True)
    u = m.uninstrumented
    assert u is not None
    for real, tracked in ((u.first_step, m.first_step), (u.steady_step, m.steady_step)):
        assert (real.start_bytes, real.peak_bytes, real.end_bytes) == (340, 628, 340)
        assert real.phase_peaks == tracked.phase_peaks
        assert real.timeline == tracked.timeline
    # At the peak, Adagrad's `std = sum.sqrt().add_(eps)`: add_ wraps eps in a 0-d float64 (8 B) and
    # casts it to float32 (4 B) inside the op; the allocator sees them, no op returns them.
    assert (u.allocator_first_peak, u.allocator_steady_peak, u.not_op_output_bytes) == (640, 640, 12)
