"""Trace a Llama-2-7B-sized training step through the module family, on the meta device.

The model is the project's own transformer (``estimator.measure.transformer``) built by
``estimator.measure.transformer_factory:preset_model`` and given to the module family like any
user module; the step is traced on fake (meta-backed) tensors, so no weight memory is used.
Prints the wall time of ``estimate()`` (torch import and trace included), the trace time, the peak
RSS of the process, and the traced estimate beside the analytic transformer family's.

    python benchmarks/trace_llama.py                       # llama-2-7b, B=1, S=512, fp32, AdamW
    python benchmarks/trace_llama.py --precision amp-bf16 --seq-len 1024

Goal (2-core machine): under 30 s and under 2 GiB RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, not an installed copy

from estimator.api import estimate  # noqa: E402
from estimator.families.module import _trace_cached, trace_module  # noqa: E402
from estimator.loader import validate_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-2-7b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--device", default="cuda", help="the estimate's device model (cuda: 512-byte blocks)")
    args = parser.parse_args()

    from estimator.presets import get_preset

    vocab = get_preset(args.preset).values["vocab_size"]
    common = {"training": {"precision": args.precision}, "optimizer": {"name": args.optimizer}}
    module_cfg = validate_config({
        "model": {
            "module": "estimator.measure.transformer_factory:preset_model",
            "kwargs": {"name": args.preset},
            "inputs": [{"shape": [args.batch_size, args.seq_len], "dtype": "int64", "high": vocab}],
            "loss": "cross_entropy",
        },
        **common,
    })
    start = time.perf_counter()
    traced = estimate(module_cfg, args.device)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    traces = _trace_cached.cache_info().currsize
    precisions = dict.fromkeys(["fp32", args.precision])  # the parameter list comes from the fp32 trace
    seconds = [trace_module(module_cfg.model, p).seconds for p in precisions]  # cached: no new trace

    analytic_cfg = validate_config({
        "model": {"preset": args.preset},
        "training": {**common["training"], "batch_size": args.batch_size, "seq_len": args.seq_len},
        "optimizer": common["optimizer"],
    })
    analytic = estimate(analytic_cfg, args.device)
    logits = args.batch_size * args.seq_len * vocab * (4 if args.precision == "fp32" else 2)

    print(f"{args.preset}, B={args.batch_size}, S={args.seq_len}, {args.precision}, {args.optimizer}, "
          f"device model {args.device}; python {sys.version.split()[0]}")
    print(f"estimate() wall time  {wall:8.2f} s  ({traces} trace(s): "
          + ", ".join(f"{s:.2f} s" for s in seconds) + "; the rest is importing torch)")
    print(f"peak RSS              {rss / 2**30:8.2f} GiB")
    print(f"{'':22} {'traced module':>22} {'analytic family':>22}")
    rows = [
        ("parameters", traced.parameters, analytic.parameters),
        ("steady-step peak", traced.peak_bytes, analytic.peak_bytes),
        ("first-step peak", traced.first_step_peak_bytes, analytic.first_step_peak_bytes),
        ("saved for backward", traced.saved_activation_bytes, analytic.saved_activation_bytes),
        ("matmul FLOPs", traced.flops.matmul, analytic.flops.matmul),
    ]
    for label, a, b in rows:
        fmt = (lambda n: f"{n:,}") if "FLOP" in label or label == "parameters" else (lambda n: f"{n:,} B")
        print(f"{label:<22} {fmt(a):>22} {fmt(b):>22}")
    print(f"peak difference {traced.peak_bytes - analytic.peak_bytes:,} bytes; the logits the training loop "
          f"holds in the module family (B·S·V at the activation dtype) = {logits:,} bytes")


if __name__ == "__main__":
    main()
