"""FSDP2 (``--parallel zero3`` / ``fsdp``) per-rank peaks of the transformer family: estimate against real gloo ranks.

Each case runs the step for real on N local processes (``fully_shard`` on every block, then on the
root, torch's own implementation, gloo on the CPU) and compares, per rank, the parameter, gradient
and optimizer-state bytes and the first- and steady-step peaks with ``per_rank_estimates``.

    python benchmarks/fsdp_accuracy.py            # the whole matrix (several minutes on 2 cores)
    python benchmarks/fsdp_accuracy.py --quick    # two cases

Traced modules (``model: {module: ...}``) are sharded on the units ``parallel.fsdp_unit_class`` chooses
(by default the repeated block class), then the root: a stack of blocks (tests/fsdp_module_blocks.py,
``--layers`` of them) and the LoRA example (frozen base weights).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from estimator.loader import load_config
from estimator.measure.distributed import measure_distributed
from estimator.parallel import per_rank_estimates

GPT2_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "vocab_size": 96, "max_seq_len": 16}
LLAMA_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 96,
              "max_seq_len": 16, "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "d_ff": 88,
              "bias": False, "tie_embeddings": False}

MASTER = ["training.master_weights=true"]  # FSDP2's MixedPrecisionPolicy(bf16, reduce_dtype) over fp32 shards
TINY_LLAMA_HF = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 88, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 16,
                 "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

ROOT = str(Path(__file__).resolve().parent.parent)
STACK = {"module": "tests.fsdp_module_blocks:make_stack", "inputs": [{"shape": [2, 16], "dtype": "int64", "high": 40}],
         "loss": "cross_entropy", "search_dir": ROOT}
MLP_CE = {"module": "estimator.measure.examples:make_mlp", "inputs": [{"shape": [8, 16]}], "loss": "cross_entropy",
          "search_dir": ROOT}  # float inputs: the MixedPrecisionPolicy casts them at the root
LORA = {"module": "estimator.measure.examples:make_lora_mlp", "inputs": [{"shape": [8, 32]}], "loss": "mse",
        "search_dir": ROOT}

# the hf family: transformers' own classes, traced as a module and sharded on their decoder layers
HF_LLAMA = {"family": "hf", "config": {**TINY_LLAMA_HF, "architectures": ["LlamaForCausalLM"]}}
HF_GPT2 = {"family": "hf", "config": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 96,
                                      "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16,
                                      "activation_function": "gelu_new"}}

# (label, model, precision, optimizer, ranks, reshard_after_forward, more overrides)
CASES = [
    ("gpt2-like", GPT2_LIKE, "fp32", "adam", 2, True, []),
    ("llama-like GQA", LLAMA_LIKE, "fp32", "adamw", 2, True, []),
    ("llama-like GQA", LLAMA_LIKE, "fp32", "adamw", 4, True, []),
    ("gpt2-like", GPT2_LIKE, "bf16", "sgd", 2, True, []),
    ("llama-like GQA", LLAMA_LIKE, "amp-bf16", "adamw", 2, True, []),
    ("gpt2-like", GPT2_LIKE, "fp32", "adagrad", 3, True, []),
    ("gpt2-like", GPT2_LIKE, "fp32", "adam", 2, False, []),
    ("llama-like GQA", LLAMA_LIKE, "fp32", "adamw", 4, False, []),
    ("llama-like GQA", LLAMA_LIKE, "bf16 + master, reduce fp32", "adamw", 2, True, MASTER),
    ("llama-like GQA", LLAMA_LIKE, "bf16 + master, reduce fp32", "adamw", 4, False, MASTER),
    ("gpt2-like", GPT2_LIKE, "bf16 + master, reduce bf16", "adam", 2, True, [*MASTER, "parallel.reduce_dtype=param"]),
    ("hf_config llama (tiny config.json)", "hf", "fp32", "adamw", 2, True, []),
    ("hf_config llama (tiny config.json)", "hf", "bf16 + master, reduce fp32", "adamw", 4, True, MASTER),
    ("module: stack of Blocks", STACK, "fp32", "adamw", 2, True, []),
    ("module: stack of Blocks", STACK, "fp32", "adam", 4, False, []),
    ("module: stack of Blocks", STACK, "bf16", "sgd", 3, True, []),
    ("module: stack of Blocks", STACK, "bf16 + master, reduce fp32", "adamw", 2, True, MASTER),
    ("module: stack of Blocks", STACK, "bf16 + master, reduce bf16", "adamw", 4, False,
     [*MASTER, "parallel.reduce_dtype=param"]),
    ("module: LoRA MLP (frozen base)", LORA, "fp32", "adamw", 2, True, []),
    ("module: LoRA MLP (frozen base)", LORA, "fp32", "adagrad", 4, False, []),
    ("module: stack of Blocks", STACK, "amp-bf16", "adamw", 2, True, []),
    ("module: stack of Blocks, 2 micro-batches, one sync", STACK, "fp32", "adamw", 2, True,
     ["training.grad_accum_steps=2", "parallel.sync_every_micro_batch=false"]),
    ("hf family: transformers LlamaForCausalLM", HF_LLAMA, "fp32", "adamw", 2, True, []),
    ("hf family: transformers LlamaForCausalLM", HF_LLAMA, "bf16 + master, reduce fp32", "adamw", 4, False, MASTER),
    ("hf family: transformers GPT2LMHeadModel", HF_GPT2, "fp32", "adam", 2, False, []),
    ("module: make_mlp, float inputs", MLP_CE, "bf16 + master, reduce fp32", "adamw", 2, True, MASTER),
    ("module: LoRA MLP, mse (fp32 target)", LORA, "bf16 + master, reduce bf16", "adamw", 4, False,
     [*MASTER, "parallel.reduce_dtype=param"]),
]


def _config(model: dict | str, precision: str, optimizer: str, reshard: bool, more: list[str], layers: int,
            tmp: str):  # noqa: ANN202
    """The case's config; 'hf' is a tiny Llama config.json read through ``model.hf_config``."""
    overrides = [f"optimizer.name={optimizer}", f"training.precision={precision.split()[0]}",
                 f"parallel.reshard_after_forward={str(reshard).lower()}", *more]
    if isinstance(model, dict) and "module" in model:  # the inputs' shapes are the batch; the stack's depth
        kwargs = {"layers": layers} if model is STACK else {}
        return load_config(None, overrides, base={"model": {**model, "kwargs": kwargs}})
    overrides += ["training.seq_len=16", "training.batch_size=2"]
    if isinstance(model, dict) and model.get("family") == "hf":  # the layer count in the config.json's key
        key = "n_layer" if "n_layer" in model["config"] else "num_hidden_layers"
        return load_config(None, overrides, base={"model": {**model, "config": {**model["config"], key: layers}}})
    if model == "hf":
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump({**TINY_LLAMA_HF, "num_hidden_layers": layers}, f)
        return load_config(None, overrides, base={"model": {"hf_config": path}})
    return load_config(None, [f"model.num_layers={layers}", *overrides], base={"model": dict(model)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cases", default="", help="comma-separated case numbers (0-based) to run")
    args = parser.parse_args()
    chosen = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES[:2] if args.quick else CASES
    print("| model | precision | optimizer | reshard after fwd | N | rank | params est/meas | grads est/meas "
          "| state est/meas | 1st peak est | 1st peak meas | steady est | steady meas | diff |")
    print("|---|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    tmp = tempfile.mkdtemp(prefix="fsdp-accuracy-")
    for label, model, precision, optimizer, n, reshard, more in chosen:
        config = _config(model, precision, optimizer, reshard, more, args.layers, tmp)
        start = time.perf_counter()
        estimates = per_rank_estimates(config, "fsdp", n, "cpu")
        measured = measure_distributed(config, "fsdp", n, "cpu", timeout=600)
        for e, m in zip(estimates, measured, strict=True):
            diff = max(abs(e.first_step_peak_bytes - m.first_step.peak_bytes) / m.first_step.peak_bytes,
                       abs(e.peak_bytes - m.steady_step.peak_bytes) / m.steady_step.peak_bytes)
            worst = max(worst, diff)
            same = lambda a, b: f"{a:,} {'=' if a == b else '≠'} {b:,}"  # noqa: E731
            print(f"| {label} | {precision} | {optimizer} | {reshard} | {n} | {e.rank} | "
                  f"{same(e.parameters, m.parameters)} | {same(e.gradients, m.gradients)} | "
                  f"{same(e.optimizer_state, m.optimizer_state)} | "
                  f"{e.first_step_peak_bytes:,} | {m.first_step.peak_bytes:,} | {e.peak_bytes:,} | "
                  f"{m.steady_step.peak_bytes:,} | {diff:.3%} |", flush=True)
        print(f"<!-- {label} N={n}: {time.perf_counter() - start:.0f} s -->", flush=True)
    print(f"\nworst per-rank peak difference: {worst:.3%}")


if __name__ == "__main__":
    main()
