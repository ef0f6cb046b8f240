"""Accuracy of the transformer family's simulated peak against `verify --device cpu`.

Small decoder-only models (GPT-2-like and Llama-like with grouped-query attention), fp32 and bf16,
SDPA and eager attention, with and without activation checkpointing, SGD and Adam. The bar (issue
5): the analytic peak within ±5% of the measured one.

    python benchmarks/transformer_accuracy.py
"""

from __future__ import annotations

import itertools
import sys
import time

from estimator import load_config
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
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
