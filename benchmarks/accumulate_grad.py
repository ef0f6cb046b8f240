"""A weight applied many times in one step: the real step against the same step under a dispatch mode.

Reproduces issue 14's numbers. One training step on the CPU of an RNN written as a loop: a
``--dim`` x ``--dim`` weight applied ``--steps`` times, ``h = tanh(h @ W)``, loss ``h.sum()``, SGD.
The peak above the start is taken from the CPU allocator's own records
(``torch.profiler.profile(profile_memory=True)``) three ways:

* plain: nothing else active (the real step);
* under a do-nothing ``TorchDispatchMode`` (what any tracing mode does to autograd): the engine
  sums the weight's fan-in gradients out of place (``old + var``) instead of ``old.add_(var)``;
* what ``estimator`` estimates for the same module (the module family, traced on fake tensors with
  the real step's in-place sums) and what ``verify`` measures (uninstrumented and instrumented).

    python benchmarks/accumulate_grad.py                 # --dim 1024 --steps 16 --batch 64
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MODULE = '''
import torch
from torch import nn


class LoopRNN(nn.Module):
    """One weight applied ``steps`` times: h = tanh(h @ W)."""

    def __init__(self, dim, steps, device=None):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim, device=device) / dim ** 0.5)
        self.steps = steps

    def forward(self, x):
        h = x
        for _ in range(self.steps):
            h = torch.tanh(h @ self.w)
        return h
'''


class DoNothing(TorchDispatchMode):
    """Runs every op unchanged; only being active matters."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def profiled_step(dim: int, steps: int, batch: int, mode: TorchDispatchMode | None) -> tuple[int, Counter]:
    """Peak bytes above the start of one step (allocator records), and the add/add_ ops it ran.

    The 16 uses of W send 16 gradients to its AccumulateGrad node; the engine sums them (15 sums)
    before AccumulateGrad steals the total. SGD's ``param.add_(grad)`` is one more ``add_``.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
    x = torch.randn(batch, dim)
    opt = torch.optim.SGD([w], lr=0.01)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with mode if mode is not None else _null():
            h = x
            for _ in range(steps):
                h = torch.tanh(h @ w)
            h.sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del h
    totals, ops, stack = [], Counter(), list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation:
            totals.append((ev.start_time_ns, ev.extra_fields.total_allocated))
        elif ev.name in ("aten::add", "aten::add_"):
            ops[ev.name] += 1  # under a mode each op has two records: its dispatch and the mode's call
        stack.extend(ev.children)
    return max((t for _, t in sorted(totals)), default=0), ops


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    dim, steps, batch = args.dim, args.steps, args.batch

    real, real_ops = profiled_step(dim, steps, batch, None)
    moded, moded_ops = profiled_step(dim, steps, batch, DoNothing())
    print(f"W {dim}x{dim} float32 ({dim * dim * 4:,} B) applied {steps} times, batch {batch}, SGD, torch "
          f"{torch.__version__}")
    print(f"  real step (no dispatch mode):        peak {real:>12,} B above the start   {dict(real_ops)}")
    print(f"  under a do-nothing TorchDispatchMode: peak {moded:>12,} B above the start   {dict(moded_ops)}"
          f"   ({moded / real - 1:+.1%}; two records per op under a mode)")

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "loop_rnn_bench.py").write_text(textwrap.dedent(MODULE))
        sys.path.insert(0, tmp)
        from estimator.loader import validate_config
        from estimator.measure.verify import run_verify

        cfg = validate_config({
            "model": {"module": "loop_rnn_bench:LoopRNN", "kwargs": {"dim": dim, "steps": steps},
                      "inputs": [{"shape": [batch, dim]}], "loss": "sum"},
            "optimizer": {"name": "sgd"}, "device": "cpu"})
        result = run_verify(cfg, "cpu")
    m = result.measurement
    start = m.real_steady_step.start_bytes
    rows = [("estimator estimate (module family):", result.estimate.peak_bytes - start),
            ("verify, real step (allocator):", m.real_steady_step.peak_bytes - start),
            ("verify, instrumented (tracker):", m.steady_step.peak_bytes - m.steady_step.start_bytes)]
    for label, nbytes in rows:
        print(f"  {label:<37} peak {nbytes:>12,} B above the start")

if __name__ == "__main__":
    main()
