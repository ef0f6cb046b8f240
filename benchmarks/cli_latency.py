"""CLI latency: `estimator estimate` and its start-up alone against `python -c "import torch"`, side by side.

Runs each command and ``import torch`` alternately (A B A B ...) after a warm-up, as whole processes,
and prints the median wall time of each and the median of the pairwise ratios. The goal is a ratio
under 0.25 for the whole command (issue 8). The children run without ``PYTHONDONTWRITEBYTECODE``, so
the warm-up writes the package's ``.pyc`` files as any install has them (torch's come with its wheel).

    python benchmarks/cli_latency.py --runs 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
COMMANDS = {
    "python -c 'import estimator.cli' (start-up)": [sys.executable, "-c", "import estimator.cli"],
    "estimator estimate --json": [sys.executable, "-m", "estimator", "estimate", "--json"],
    "estimator estimate": [sys.executable, "-m", "estimator", "estimate"],
}
TORCH = [sys.executable, "-c", "import torch"]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CHILD_ENV)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    wall(TORCH)  # warm-up: page cache
    for cmd in COMMANDS.values():
        wall(cmd)  # warm-up: page cache, .pyc files
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    torch_times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for _ in range(args.runs):
        for label, cmd in COMMANDS.items():
            times[label].append(wall(cmd))
            torch_times[label].append(wall(TORCH))
    print(f"{'command':<46} {'median s':>9} {'min s':>7} {'max s':>7}  ratio to import torch: median (min, max)")
    for label in COMMANDS:
        a, b = times[label], torch_times[label]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        print(f"{label:<46} {statistics.median(a):9.3f} {min(a):7.3f} {max(a):7.3f}  "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}, {max(ratios):.3f})")
    every = [t for ts in torch_times.values() for t in ts]
    label = 'python -c "import torch"'
    print(f"{label:<46} {statistics.median(every):9.3f} {min(every):7.3f} {max(every):7.3f}")
    print(f"{args.runs} pairs per command; goal: the whole command under 0.25")


if __name__ == "__main__":
    main()
