"""Tensor parallelism (``--parallel tp``) per-rank memory of the transformer family: estimate against real gloo ranks.

Each case runs the step for real on t local processes with torch's own plan
(``parallelize_module``: ColwiseParallel q/k/v and gate/up, RowwiseParallel o_proj and down_proj, the
vocab-sharded embedding and head; ``estimator.measure.tp``) and compares, per rank, the parameter,
gradient and optimizer-state bytes, the first- and steady-step peaks, and the all-reduce calls and
bytes torch's flight recorder saw with ``per_rank_estimates``.

    python benchmarks/tp_accuracy.py            # the whole matrix (several minutes on 2 cores)
    python benchmarks/tp_accuracy.py --quick    # two cases
    python benchmarks/tp_accuracy.py --korthikanti   # activation bytes per layer against Korthikanti et al. Table 2
"""

from __future__ import annotations

import argparse
import time

from estimator.loader import load_config
from estimator.measure.comm_record import measured_communication
from estimator.measure.distributed import measure_distributed
from estimator.parallel import per_rank_estimates
from estimator.parallel.comm import CommVolume, MeshVolume

GPT2_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "vocab_size": 96, "max_seq_len": 16}
LLAMA_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 96,
              "max_seq_len": 16, "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "d_ff": 88,
              "bias": False, "tie_embeddings": False}
NEOX_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "vocab_size": 96, "max_seq_len": 16,
             "positions": "rope", "rotary_pct": 0.5, "parallel_residual": True, "tie_embeddings": False}

CKPT = "training.activation_checkpointing=full"
# (label, model, precision, optimizer, t, extra --set)
CASES = [
    ("gpt2-like (tied, biases)", GPT2_LIKE, "fp32", "adam", 2, ()),
    ("llama-like GQA", LLAMA_LIKE, "fp32", "adamw", 2, ()),
    ("llama-like GQA, loss parallel", LLAMA_LIKE, "fp32", "adamw", 2, ("parallel.loss_parallel=true",)),
    ("gpt2-like (tied, biases)", GPT2_LIKE, "bf16", "sgd", 2, ()),
    ("llama-like GQA", LLAMA_LIKE, "bf16", "adamw", 2, ()),
    ("llama-like GQA", LLAMA_LIKE, "amp-bf16", "adamw", 2, ()),
    ("gpt2-like (tied, biases)", GPT2_LIKE, "fp32", "adagrad", 4, ()),
    ("llama-like GQA, SP", LLAMA_LIKE, "fp32", "adamw", 2, ("parallel.sequence_parallel=true",)),
    ("llama-like GQA, SP + loss parallel", LLAMA_LIKE, "bf16", "adamw", 2,
     ("parallel.sequence_parallel=true", "parallel.loss_parallel=true")),
    ("neox-like (rope, layernorm, gelu, biases, parallel residual), SP", NEOX_LIKE, "amp-bf16", "adam", 2,
     ("parallel.sequence_parallel=true",)),
    ("llama-like MHA, SP", {**LLAMA_LIKE, "num_kv_heads": 4}, "fp32", "sgd", 4, ("parallel.sequence_parallel=true",)),
    # 2-D: FSDP2 x TP on a (dp, tp) = (2, 2) mesh (4 processes)
    ("2-D zero3 x tp: llama-like GQA", LLAMA_LIKE, "fp32", "adam", 4, ("parallel.tp_size=2",)),
    ("2-D zero3 x tp: gpt2-like (tied, biases)", GPT2_LIKE, "bf16", "adamw", 4, ("parallel.tp_size=2",)),
    ("2-D zero3 x tp + SP: llama-like GQA", LLAMA_LIKE, "fp32", "adamw", 4,
     ("parallel.tp_size=2", "parallel.sequence_parallel=true")),
    ("2-D zero3 x tp + SP: llama-like GQA", LLAMA_LIKE, "amp-bf16", "adamw", 4,
     ("parallel.tp_size=2", "parallel.sequence_parallel=true")),
    ("2-D fsdp (no reshard) x tp + SP: llama-like GQA", LLAMA_LIKE, "amp-bf16", "adamw", 4,
     ("parallel.tp_size=2", "parallel.sequence_parallel=true", "parallel.reshard_after_forward=false")),
    # activation checkpointing per block (training.activation_checkpointing: full) on the TP-parallelized model
    ("ckpt: llama-like GQA", LLAMA_LIKE, "fp32", "adam", 2, (CKPT,)),
    ("ckpt: llama-like GQA, SP", LLAMA_LIKE, "fp32", "adam", 2, (CKPT, "parallel.sequence_parallel=true")),
    ("ckpt: llama-like GQA", LLAMA_LIKE, "bf16", "adam", 2, (CKPT,)),
    ("ckpt: llama-like GQA, SP", LLAMA_LIKE, "amp-bf16", "adamw", 2, (CKPT, "parallel.sequence_parallel=true")),
    ("ckpt: gpt2-like (tied, biases)", GPT2_LIKE, "bf16", "adam", 2, (CKPT,)),
    ("ckpt: gpt2-like (tied, biases)", GPT2_LIKE, "amp-bf16", "adam", 2, (CKPT,)),
    ("ckpt: llama-like GQA, loss parallel", LLAMA_LIKE, "fp32", "adam", 2, (CKPT, "parallel.loss_parallel=true")),
    ("ckpt: neox-like, SP", NEOX_LIKE, "bf16", "adamw", 2, (CKPT, "parallel.sequence_parallel=true")),
    ("ckpt, 2-D zero3 x tp + SP: llama-like GQA", LLAMA_LIKE, "fp32", "adam", 4,
     (CKPT, "parallel.tp_size=2", "parallel.sequence_parallel=true")),
    ("ckpt, 2-D zero3 x tp: gpt2-like (tied, biases)", GPT2_LIKE, "amp-bf16", "adam", 4, (CKPT, "parallel.tp_size=2")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cases", default="", help="comma-separated case numbers (0-based) to run")
    parser.add_argument("--korthikanti", action="store_true", help="only the per-layer activation table (no ranks)")
    args = parser.parse_args()
    if args.korthikanti:
        korthikanti()
        return
    chosen = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES[:2] if args.quick else CASES
    print("| model | precision | optimizer | ranks | rank | params est/meas | grads est/meas | state est/meas "
          "| 1st peak est | 1st peak meas | steady est | steady meas | all-reduce calls, B est/meas | "
          "every collective equal, steps 1-3 | diff |")
    print("|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---|---|---:|")
    worst = 0.0
    for label, model, precision, optimizer, t, extra in chosen:
        config = load_config(None, [f"model.num_layers={args.layers}", "training.seq_len=16", "training.batch_size=2",
                                    f"optimizer.name={optimizer}", f"training.precision={precision}", *extra],
                             base={"model": dict(model)})
        start = time.perf_counter()
        strategy = "tp" if config.parallel.tp_size == 1 else (
            "fsdp" if not config.parallel.reshard_after_forward else "zero3")
        estimates = per_rank_estimates(config, strategy, t, "cpu")
        measured = measure_distributed(config, strategy, t, "cpu")
        for e, m in zip(estimates, measured, strict=True):
            diff = max(abs(e.first_step_peak_bytes - m.first_step.peak_bytes) / m.first_step.peak_bytes,
                       abs(e.peak_bytes - m.steady_step.peak_bytes) / m.steady_step.peak_bytes)
            worst = max(worst, diff)
            same = lambda a, b: f"{a:,} {'=' if a == b else '≠'} {b:,}"  # noqa: E731
            got = measured_communication(m)
            est_ar = _all_reduce(e.communication_volume.steady_step if e.communication_volume else None)
            meas_ar = _all_reduce(got.steady_step if got else None)
            every = e.communication_volume is not None and got is not None and all(
                getattr(got, k).logical() == getattr(e.communication_volume, k).logical()
                for k in ("first_step", "second_step", "steady_step"))
            print(f"| {label} | {precision} | {optimizer} | {t} | {e.rank} | "
                  f"{same(e.parameters, m.parameters)} | {same(e.gradients, m.gradients)} | "
                  f"{same(e.optimizer_state, m.optimizer_state)} | "
                  f"{e.first_step_peak_bytes:,} | {m.first_step.peak_bytes:,} | {e.peak_bytes:,} | "
                  f"{m.steady_step.peak_bytes:,} | {est_ar} {'=' if est_ar == meas_ar else '≠'} {meas_ar} | "
                  f"{'yes' if every else 'NO'} | "
                  f"{diff:.3%} |", flush=True)
        print(f"<!-- {label} {precision} t={t}: {time.perf_counter() - start:.0f} s -->", flush=True)
    print(f"\nworst per-rank peak difference: {worst:.3%}")


def korthikanti(s: int = 2048, b: int = 1, h: int = 2048, a: int = 16) -> None:
    """Saved bytes per layer (two layers less one) of a GPT-like layer with RoPE, bf16, in units of sbh,
    against Korthikanti et al. 2022, Table 2 (docs/tp.md)."""
    model = {"family": "transformer", "d_model": h, "num_heads": a, "vocab_size": 32000, "max_seq_len": s,
             "positions": "rope", "norm": "layernorm", "bias": True, "mlp": "gelu", "tie_embeddings": False}
    sbh = s * b * h
    print("| layout | t | Korthikanti (sbh) | ours, eager (sbh) | ours, SDPA (sbh) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for sp in (False, True):
        for t in (2, 4, 8):
            ours = []
            for attention in ("eager", "sdpa"):
                saved = []
                for layers in (1, 2):
                    cfg = load_config(None, [f"model.num_layers={layers}", f"training.seq_len={s}",
                                             f"training.batch_size={b}", "training.precision=bf16",
                                             "optimizer.name=sgd", f"model.attention={attention}",
                                             f"parallel.sequence_parallel={str(sp).lower()}"],
                                      base={"model": dict(model)})
                    saved.append(per_rank_estimates(cfg, "tp", t, "cpu")[0].activations)
                ours.append((saved[1] - saved[0]) / sbh)
            theirs = 34 / t + 5 * a * s / (h * t) if sp else 10 + 24 / t + 5 * a * s / (h * t)
            print(f"| TP{' + SP' if sp else ''} | {t} | {theirs:g} | {ours[0]:.4f} | {ours[1]:.4f} |")
    for sp in (False, True):  # full recomputation per block: the block's input is all a layer keeps
        for t in (2, 4, 8):
            saved = []
            for layers in (1, 2):
                cfg = load_config(None, [f"model.num_layers={layers}", f"training.seq_len={s}",
                                         f"training.batch_size={b}", "training.precision=bf16", "optimizer.name=sgd",
                                         "model.attention=sdpa", "training.activation_checkpointing=full",
                                         f"parallel.sequence_parallel={str(sp).lower()}"], base={"model": dict(model)})
                saved.append(per_rank_estimates(cfg, "tp", t, "cpu")[0].activations)
            ours_full = (saved[1] - saved[0]) / sbh
            print(f"| TP{' + SP' if sp else ''} + full recompute | {t} | 2 | {ours_full:.4f} | {ours_full:.4f} |")


def _all_reduce(step: CommVolume | MeshVolume | None) -> str:
    """The step's all-reduces (over every group of a 2-D mesh): calls and bytes."""
    v = step.get("all_reduce") if step is not None else None
    return f"{v.calls} x, {v.size_bytes:,}" if v else "0 x, 0"


if __name__ == "__main__":
    main()
