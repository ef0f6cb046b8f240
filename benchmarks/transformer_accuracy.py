"""Accuracy of the transformer family's simulated peak, and of a traced module, against `verify --device cpu`.

Table 1: small decoder-only models (GPT-2-like and Llama-like with grouped-query attention), fp32
and bf16, SDPA and eager attention, with and without activation checkpointing, SGD and Adam; the
analytic family's peak against the measured one (bar, issue 5: ±5%).

Table 2: the same architectures given as user modules (`model: {module: ...}`, the project's torch
transformer through `estimator.measure.transformer_factory:preset_model`, cross-entropy on the
logits it returns), traced on fake tensors, against `verify` of that module (bar: ±1%).

    python benchmarks/transformer_accuracy.py [--skip-analytic] [--skip-traced]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from estimator import load_config
from estimator.loader import validate_config
from estimator.measure.verify import run_verify

MODELS = {
    "gpt2-like d=256 L=4": ["model.family=transformer", "model.vocab_size=4096", "model.d_model=256",
                            "model.num_layers=4", "model.num_heads=8", "model.max_seq_len=256"],
    "llama-like d=256 L=4 GQA": ["model.family=transformer", "model.vocab_size=4096", "model.d_model=256",
                                 "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=2",
                                 "model.d_ff=688", "model.mlp=swiglu", "model.norm=rmsnorm", "model.bias=false",
                                 "model.positions=rope", "model.tie_embeddings=false", "model.max_seq_len=256"],
}
BATCH = ["training.batch_size=4", "training.seq_len=256"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-analytic", action="store_true")
    parser.add_argument("--skip-traced", action="store_true")
    args = parser.parse_args()
    failures = 0 if args.skip_analytic else analytic_table()
    if not args.skip_traced:
        failures += traced_table()
    return 1 if failures else 0


# The same two architectures as user modules: preset_model(name, **fields) builds our transformer.
MODULES = {
    "gpt2-like d=256 L=4": {"name": "gpt2", "vocab_size": 4096, "d_model": 256, "num_layers": 4, "num_heads": 8,
                            "max_seq_len": 256},
    "llama-like d=256 L=4 GQA": {"name": "llama-2-7b", "vocab_size": 4096, "d_model": 256, "num_layers": 4,
                                 "num_heads": 8, "num_kv_heads": 2, "d_ff": 688, "max_seq_len": 256},
}


def traced_table() -> int:
    print("\n| module (traced) | checkpointing | precision | optimizer | traced peak | measured | error "
          "| first-step error | within ±1% |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = 0
    start = time.perf_counter()
    for (name, kwargs), ckpt, precision, optimizer in itertools.product(
        MODULES.items(), ["none", "full"], ["fp32", "bf16"], ["sgd", "adam"]
    ):
        cfg = validate_config({
            "model": {"module": "estimator.measure.transformer_factory:preset_model",
                      "kwargs": {**kwargs, "activation_checkpointing": ckpt},
                      "inputs": [{"shape": [4, 256], "dtype": "int64", "high": 4096}], "loss": "cross_entropy"},
            "training": {"precision": precision}, "optimizer": {"name": optimizer}})
        result = run_verify(cfg, "cpu")
        est, m = result.estimate, result.measurement
        err = (est.peak_bytes - m.steady_step.peak_bytes) / m.steady_step.peak_bytes
        err_first = (est.first_step_peak_bytes - m.first_step.peak_bytes) / m.first_step.peak_bytes
        ok = abs(err) <= 0.01 and abs(err_first) <= 0.01
        failures += not ok
        print(f"| {name} | {ckpt} | {precision} | {optimizer} | {est.peak_bytes:,} | {m.steady_step.peak_bytes:,} "
              f"| {err:+.3%} | {err_first:+.3%} | {'yes' if ok else 'NO'} |")
        sys.stdout.flush()
    print(f"\n{failures} case(s) outside ±1%; {time.perf_counter() - start:.0f} s")
    return failures


def analytic_table() -> int:
    print("| model | attention | checkpointing | precision | optimizer | est. peak | measured | error "
          "| first-step error | within ±5% |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    start = time.perf_counter()
    for (name, model), attention, ckpt, precision, optimizer in itertools.product(
        MODELS.items(), ["sdpa", "eager"], ["none", "full"], ["fp32", "bf16"], ["sgd", "adam"]
    ):
        cfg = load_config(overrides=[*model, *BATCH, f"model.attention={attention}",
                                     f"training.activation_checkpointing={ckpt}",
                                     f"training.precision={precision}", f"optimizer.name={optimizer}"])
        result = run_verify(cfg, "cpu")
        est, m = result.estimate, result.measurement
        err = (est.peak_bytes - m.steady_step.peak_bytes) / m.steady_step.peak_bytes
        err_first = (est.first_step_peak_bytes - m.first_step.peak_bytes) / m.first_step.peak_bytes
        ok = abs(err) <= 0.05 and abs(err_first) <= 0.05
        failures += not ok
        print(f"| {name} | {attention} | {ckpt} | {precision} | {optimizer} | {est.peak_bytes:,} "
              f"| {m.steady_step.peak_bytes:,} | {err:+.3%} | {err_first:+.3%} | {'yes' if ok else 'NO'} |")
        sys.stdout.flush()
    print(f"\n{failures} case(s) outside ±5%; {time.perf_counter() - start:.0f} s")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
