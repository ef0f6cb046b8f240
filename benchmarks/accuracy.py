"""Accuracy of the simulated peak against `verify` on the CPU, for every optimizer x precision x shape.

For each case this runs the real step (two steps: the first, where the optimizer state is created,
and a steady one) with the live-tensor tracker, and prints the estimated and measured peaks and
their relative error. The bar (issue 4): within ±2%, and within 64 bytes for the seed's tiny model.

    python benchmarks/accuracy.py                 # the matrix (about a minute on 2 cores)
    python benchmarks/accuracy.py --issue-examples  # also the issue's D=4096, 8 layers, B=4096 case
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from estimator import load_config
from estimator.measure.verify import run_verify
from estimator.units import human_bytes

SHAPES = {
    "seed (B=2, D=4, L=2)": ["model.dim=4", "model.num_layers=2", "training.batch_size=2"],
    "params dominate (B=64, D=1024, L=4)": ["model.dim=1024", "model.num_layers=4", "training.batch_size=64"],
    "activations dominate (B=16384, D=256, L=8)": ["model.dim=256", "model.num_layers=8",
                                                    "training.batch_size=16384"],
}
ISSUE_EXAMPLES = {"issue example (B=4096, D=4096, L=8)": ["model.dim=4096", "model.num_layers=8",
                                                          "training.batch_size=4096"]}
OPTIMIZERS = ["sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "adafactor"]
PRECISIONS = ["fp32", "bf16", "amp-bf16"]


def within(estimated: int, measured: int, tiny: bool) -> bool:
    return abs(estimated - measured) <= 64 if tiny else abs(estimated - measured) <= 0.02 * measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issue-examples", action="store_true", help="add the 1.2 GiB case (slow)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    args = parser.parse_args()
    shapes = dict(SHAPES)
    if args.issue_examples:
        shapes.update(ISSUE_EXAMPLES)
    print("| shape | optimizer | precision | seed's sum | est. steady peak | measured | error "
          "| est. first-step peak | measured | error | within bar |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    start = time.perf_counter()
    for (shape, overrides), opt, prec in itertools.product(
        shapes.items(), args.optimizers.split(","), args.precisions.split(",")
    ):
        if shape.startswith("issue") and opt not in ("sgd", "adam"):
            continue
        cfg = load_config(overrides=[*overrides, f"optimizer.name={opt}", f"training.precision={prec}"])
        result = run_verify(cfg, "cpu")
        est, m = result.estimate, result.measurement
        tiny = shape.startswith("seed")
        ok = within(est.peak_bytes, m.steady_step.peak_bytes, tiny) and within(
            est.first_step_peak_bytes, m.first_step.peak_bytes, tiny)
        failures += not ok
        print(f"| {shape} | {opt} | {prec} | {human_bytes(est.memory.total)} "
              f"| {est.peak_bytes:,} | {m.steady_step.peak_bytes:,} | {_err(est.peak_bytes, m.steady_step.peak_bytes)} "
              f"| {est.first_step_peak_bytes:,} | {m.first_step.peak_bytes:,} "
              f"| {_err(est.first_step_peak_bytes, m.first_step.peak_bytes)} | {'yes' if ok else 'NO'} |")
        sys.stdout.flush()
    print(f"\n{failures} case(s) outside the bar; {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


def _err(estimated: int, measured: int) -> str:
    if estimated == measured:
        return "0 (exact)"
    return f"{(estimated - measured) / measured:+.3%} ({estimated - measured:+,} B)"


if __name__ == "__main__":
    raise SystemExit(main())
