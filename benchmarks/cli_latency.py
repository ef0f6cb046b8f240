"""CLI latency: `estimator estimate` against `python -c "import torch"`, measured side by side.

Runs the two commands alternately (A B A B ...) after a warm-up, as whole processes, and prints the
median wall time of each and the median of the pairwise ratios. The goal is a ratio under 0.25.

    python benchmarks/cli_latency.py --runs 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    estimate = [sys.executable, "-m", "estimator", "estimate", "--json"]
    torch_import = [sys.executable, "-c", "import torch"]
    wall(estimate), wall(torch_import)  # warm-up: page cache, .pyc files
    a, b = [], []
    for _ in range(args.runs):
        a.append(wall(estimate))
        b.append(wall(torch_import))
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    print(f"{'command':<40} {'median s':>9} {'min s':>7} {'max s':>7}")
    print(f"{'estimator estimate --json':<40} {statistics.median(a):9.3f} {min(a):7.3f} {max(a):7.3f}")
    label = 'python -c "import torch"'
    print(f"{label:<40} {statistics.median(b):9.3f} {min(b):7.3f} {max(b):7.3f}")
    print(f"ratio estimate / import torch: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.runs} pairs; goal < 0.25")


if __name__ == "__main__":
    main()
