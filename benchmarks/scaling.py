"""How the analytic core's cost grows: layers, world size, and every preset against `import torch`.

Three tables, all measured in one run on this machine:

1. ``estimate()`` in-process wall time against the layer count (the seed's MLP, 10^2 ... 10^5 layers;
   and a Llama-like transformer), with the growth exponent fitted by least squares on log-log.
2. ``rank_groups()`` in-process wall time against the world size (2 ... 4,096) for DDP and ZeRO-1/2/3,
   with the number of distinct ranks computed and the fitted exponent.
3. Whole commands against ``python -c "import torch"``, alternated A B A B ... (after one warm-up of
   both), the median of the pairwise ratios: the seed's example, a 100,000-layer MLP, 100,000 DDP
   ranks, a tiny traced ``nn.Module`` (beside ``import torch`` with the two packages any trace on fake
   tensors imports on torch 2.13, its floor: see docs/module.md), then every preset plain, with ``--gpu``, with
   ``--parallel zero2 -n 8`` and with ``--parallel fsdp -n 1024``.

Run it with the interpreter of a clean virtual environment, as a user installs the package (the README's
``pip install .``: no editable-install finder, which a development interpreter loads at every start-up,
and nothing else on ``site``'s path), with torch and numpy in it: the commands are then measured against
an ``import torch`` of the same interpreter. The children import the package from this checkout
(``PYTHONPATH``), whatever is installed::

    python -m venv /tmp/bv && /tmp/bv/bin/pip install "torch==2.13.0" numpy .
    /tmp/bv/bin/python benchmarks/scaling.py

The first line printed names the interpreter, where ``estimator`` was imported from, and its bare start-up
(``python -c pass``).

The child processes run without ``PYTHONDONTWRITEBYTECODE`` (the warm-up compiles every module of the
package, ``python -m compileall``, as any install has them: not only those a plain ``estimate`` imports,
or the first ``--gpu`` or ``--parallel`` run would compile the modules only it imports; torch's come with
its wheel), so that neither side compiles source.

    python benchmarks/scaling.py                 # everything (about 25 minutes on 2 cores)
    python benchmarks/scaling.py --pairs 2 --presets gpt2,llama-2-70b --skip-layers --skip-world

Targets (issue 8): presets, with --gpu and with --parallel -n 1024, at most 0.25x import torch; layers
exponent <= 1.1 and a 100,000-layer MLP under one second; cost independent of world size once the
distinct ranks are computed; a traced small module within 1.5x import torch.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, not an installed copy

from estimator.api import estimate  # noqa: E402
from estimator.loader import load_config  # noqa: E402
from estimator.parallel import rank_groups  # noqa: E402
from estimator.presets import PRESETS  # noqa: E402

TORCH = [sys.executable, "-c", "import torch"]
TRACE_FLOOR = [sys.executable, "-c", "import torch, torch.fx.experimental.symbolic_shapes, torch.distributed.tensor"]
ESTIMATOR = [sys.executable, "-m", "estimator"]
ROOT = Path(__file__).resolve().parent.parent
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
CHILD_ENV["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
TINY_MODULE = '''import torch.nn as nn


def make():
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 12))
'''
TINY_CONFIG = """model:
  module: tiny_module:make
  inputs:
    - {shape: [4, 20], dtype: float32}
  loss: mse
"""


def run(cmd: list[str], cwd: str | None = None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (KiB) and exit code of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, env=CHILD_ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status)


_WARM: list[bool] = []


def paired(cmd: list[str], pairs: int, cwd: str | None = None) -> dict[str, float]:
    """``cmd`` and ``import torch`` alternated (after one warm-up of each, once per run: page cache and
    the package's ``.pyc`` files): medians and the pairwise ratio."""
    if not _WARM:  # every module of the package compiled, not only those a plain estimate imports
        compiled = run([sys.executable, "-m", "compileall", "-q", str(ROOT / "estimator")])[2] == 0
        _WARM.append(compiled and run(TORCH)[2] == 0 and run([*ESTIMATOR, "estimate"])[2] == 0)
    a, b, rss = [], [], []
    for _ in range(pairs):
        wall, kib, code = run(cmd, cwd)
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {code}")
        a.append(wall)
        rss.append(kib)
        b.append(run(TORCH)[0])
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"cmd": statistics.median(a), "torch": statistics.median(b), "ratio": statistics.median(ratios),
            "ratio_max": max(ratios), "rss_mib": max(rss) / 1024}


def clear_caches() -> None:
    """Forget every simulated step, periodic shape, FSDP2 event list and rank estimate, so each call starts
    from scratch."""
    from estimator import parallel, periodic, simulate
    from estimator.parallel import fsdp

    simulate._SIMULATED.clear()
    simulate._BODIES.clear()
    simulate._MARKED.clear()
    simulate.clear_caches()  # the forward-backward programs and patterns too (simulate._BODY_PROGRAMS, ...)
    periodic._SHAPES.clear()
    fsdp._MARKED.clear()
    parallel.clear_caches()


def in_process(fn, repeats: int = 3) -> float:  # noqa: ANN001
    """Median wall seconds of ``fn()``, every call from scratch (the caches are cleared before each)."""
    times = []
    for _ in range(repeats):
        clear_caches()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def layers_table() -> None:
    print("## estimate() against the layer count (in-process, median of 3)\n")
    print("| model | layers | seconds |")
    print("|---|---:|---:|")
    for label, base, counts in (
        ("mlp D=4 (the seed's), adagrad", None, [100, 300, 1_000, 3_000, 10_000, 30_000, 100_000]),
        ("llama-2-7b blocks, adamw amp-bf16", {"model": {"preset": "llama-2-7b"}}, [100, 300, 1_000, 3_000, 10_000]),
    ):
        xs, ys = [], []
        for n in counts:
            config = load_config(None, [f"model.num_layers={n}"], base=base)
            seconds = in_process(lambda c=config: estimate(c, "cuda"))
            xs.append(n)
            ys.append(seconds)
            print(f"| {label} | {n:,} | {seconds:.4f} |")
        print(f"| {label} | fitted exponent | **{exponent(xs, ys):.2f}** |")
    print()


def world_table(preset: str) -> None:
    print(f"## rank_groups() against the world size ({preset}, in-process, median of 3)\n")
    print("| strategy | world size | distinct rank groups | seconds |")
    print("|---|---:|---:|---:|")
    config = load_config(None, [], base={"model": {"preset": preset}})
    sizes = [2, 8, 32, 128, 512, 1024, 4096]
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        xs, ys = [], []
        for n in sizes:
            try:
                clear_caches()
                groups = rank_groups(config, strategy, n, "cuda")
            except Exception as exc:  # noqa: BLE001 - a strategy not modelled for this family is reported
                print(f"| {strategy} | {n:,} | - | {type(exc).__name__}: {exc} |")
                break
            seconds = in_process(lambda s=strategy, n=n: rank_groups(config, s, n, "cuda"))
            xs.append(n)
            ys.append(seconds)
            print(f"| {strategy} | {n:,} | {len(groups)} | {seconds:.4f} |")
        if len(xs) > 1:
            tail = [i for i, n in enumerate(xs) if n >= 128]
            print(f"| {strategy} | exponent over all / from 128 ranks | | "
                  f"{exponent(xs, ys):.2f} / **{exponent([xs[i] for i in tail], [ys[i] for i in tail]):.2f}** |")
    print()


def commands_table(presets: list[str], pairs: int, gpu: str, extras: bool = True) -> None:
    print(f"## Whole commands against `python -c \"import torch\"` (A B A B ..., {pairs} pairs per command)\n")
    print("| command | median s | import torch median s | ratio (median of pairs) | max ratio | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    est = ESTIMATOR
    cases: list[tuple[str, list[str], str | None]] = [
        ("estimate (the seed's example)", [*est, "estimate"], None),
        ("estimate --json (the seed's example)", [*est, "estimate", "--json"], None),
        ("estimate --set model.num_layers=100000", [*est, "estimate", "--set", "model.num_layers=100000"], None),
        ("estimate --parallel ddp -n 100000", [*est, "estimate", "--parallel", "ddp", "-n", "100000"], None),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "tiny_module.py").write_text(TINY_MODULE)
        Path(tmp, "tiny.yaml").write_text(TINY_CONFIG)
        cases.append(("estimate tiny.yaml (a traced 1,002-parameter nn.Module)", [*est, "estimate", "tiny.yaml"], tmp))
        cases.append(('python -c "import torch, torch.fx.experimental.symbolic_shapes, torch.distributed.tensor" '
                      '(what a fake-tensor trace imports on torch 2.13, docs/module.md)', TRACE_FLOOR, None))
        if not extras:
            cases.clear()
        for name in presets:
            for extra in ([], ["--gpu", gpu], ["--parallel", "zero2", "-n", "8"], ["--parallel", "fsdp", "-n", "1024"]):
                cases.append((" ".join(["estimate --model", name, *extra]), [*est, "estimate", "--model", name, *extra],
                              None))
        for label, cmd, cwd in cases:
            try:
                r = paired(cmd, pairs, cwd)
            except SystemExit as exc:
                print(f"| `{label}` | failed: {exc} | | | | |", flush=True)
                continue
            print(f"| `{label}` | {r['cmd']:.3f} | {r['torch']:.3f} | **{r['ratio']:.3f}** | {r['ratio_max']:.3f} | "
                  f"{r['rss_mib']:.0f} |", flush=True)
    print()


def interpreter_note() -> str:
    """Where the children import ``estimator`` from, and the interpreter's bare start-up (median of 5)."""
    where = subprocess.run([sys.executable, "-c", "import estimator; print(estimator.__file__)"], env=CHILD_ENV,
                           capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout.strip()
    bare = statistics.median(run([sys.executable, "-c", "pass"])[0] for _ in range(5))
    finders = sorted(p.name for d in map(Path, sys.path) if d.is_dir() and d.name == "site-packages"
                     for p in d.glob("__editable__*.pth"))
    return (f"estimator imported from {where}; `python -c pass` {bare:.3f} s; editable-install finders on site's "
            f"path: {', '.join(finders) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs per command (one warm-up per run)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    parser.add_argument("--gpu", default="a100-80gb")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-world", action="store_true")
    parser.add_argument("--skip-commands", action="store_true")
    parser.add_argument("--presets-only", action="store_true", help="in the command table, only the presets' rows")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()[0]:.1f}")
    print(interpreter_note() + "\n")
    # the whole commands first: a child's peak RSS (``wait4``) counts the pages it shares with this process
    # until it execs, so after the in-process tables every child would report this process's size
    if not args.skip_commands:
        commands_table([p for p in args.presets.split(",") if p], args.pairs, args.gpu, not args.presets_only)
    if not args.skip_layers:
        layers_table()
    if not args.skip_world:
        world_table("llama-2-7b")
    print(f"finished {time.strftime('%H:%M:%S %Z')}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
