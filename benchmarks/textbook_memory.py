"""Steady-step memory of the textbook optimizers against torch.optim, measured on the CPU.

    python benchmarks/textbook_memory.py [--dim 1024] [--layers 4] [--batch 64]

Runs the seed's step (Cruncher, MSE loss, fp32) with ``measure_training_step`` for each optimizer
and prints a Markdown table. ``opt. temporaries`` is the optimizer phase's peak minus the bytes live
when it began: what the update itself allocates on top of parameters, gradients and state.
torch.optim on the CPU defaults to its for-loop implementation; the foreach one (CUDA's default)
is listed too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from estimator.measure import textbook as tb  # noqa: E402
from estimator.measure.mlp import build_cruncher  # noqa: E402
from estimator.measure.step import measure_training_step  # noqa: E402

Maker = Callable[..., torch.optim.Optimizer]

ROWS: list[tuple[str, str, Maker]] = [
    ("sgd", "textbook", lambda p: tb.SGD(p, lr=0.01)),
    ("sgd", "torch for-loop", lambda p: torch.optim.SGD(p, lr=0.01, foreach=False)),
    ("sgd", "torch foreach", lambda p: torch.optim.SGD(p, lr=0.01, foreach=True)),
    ("momentum", "textbook", lambda p: tb.Momentum(p, lr=0.01, momentum=0.9)),
    ("momentum", "torch for-loop", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, foreach=False)),
    ("momentum", "torch foreach", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, foreach=True)),
    ("adagrad", "textbook (seed)", lambda p: tb.AdaGrad(p, lr=0.01)),
    ("adagrad", "torch for-loop", lambda p: torch.optim.Adagrad(p, lr=0.01, foreach=False)),
    ("adagrad", "torch foreach", lambda p: torch.optim.Adagrad(p, lr=0.01, foreach=True)),
    ("rmsprop", "textbook", lambda p: tb.RMSProp(p, lr=0.01)),
    ("rmsprop", "torch for-loop", lambda p: torch.optim.RMSprop(p, lr=0.01, foreach=False)),
    ("rmsprop", "torch foreach", lambda p: torch.optim.RMSprop(p, lr=0.01, foreach=True)),
    ("adam", "textbook", lambda p: tb.Adam(p)),
    ("adam", "torch for-loop", lambda p: torch.optim.Adam(p, foreach=False)),
    ("adam", "torch foreach", lambda p: torch.optim.Adam(p, foreach=True)),
    ("adamw", "textbook", lambda p: tb.AdamW(p)),
    ("adamw", "torch for-loop", lambda p: torch.optim.AdamW(p, foreach=False)),
    ("adamw", "torch foreach", lambda p: torch.optim.AdamW(p, foreach=True)),
]


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    size = f"Cruncher D={args.dim}, num_layers={args.layers}, B={args.batch}"
    print(f"{size}, fp32, CPU, torch {torch.__version__}")
    print()
    print(
        "| optimizer | implementation | state MiB | step tensors B | steady peak MiB | steady peak bytes "
        "| opt. temporaries MiB | first-step peak MiB | peak phase |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, impl, make in ROWS:
        torch.manual_seed(0)
        m = measure_training_step(
            lambda: build_cruncher(args.dim, args.layers),
            lambda: ((torch.randn(args.batch, args.dim),), torch.randn(args.batch)),
            F.mse_loss,
            make,
            "cpu",
        )
        s = m.steady_step
        temporaries = s.phase_peaks["optimizer_step"] - s.phase_start_bytes["optimizer_step"]
        cells = [name, impl, mib(m.optimizer_state), m.optimizer_step_tensors, mib(s.peak_bytes)]
        cells += [s.peak_bytes, mib(temporaries), mib(m.first_step.peak_bytes), s.peak_phase]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    p = m.parameters
    print()
    print(f"parameters {p} B ({mib(p)} MiB), gradients {m.gradients} B, activations {m.activations} B")


if __name__ == "__main__":
    main()
