"""Communication volume per rank per step: the estimate against every collective real gloo ranks call.

Each case runs ``verify --parallel``'s harness (N local processes, torch's own DDP,
ZeroRedundancyOptimizer or FSDP2 ``fully_shard``, gloo on the CPU); torch's flight recorder lists each
collective with its input and output tensors (estimator/measure/comm_record.py). Printed per case: the
later (third) step's collectives by kind, estimated and measured (calls, bytes in, bytes out, the same on
every rank or the ranks that differ), the ring's bytes on the wire per rank, and whether the first and
second steps matched too. A markdown table for docs/distributed.md.

    python benchmarks/comm_volume.py                          # strategies x N in {2, 4} x {mlp, transformer}
    python benchmarks/comm_volume.py --world-sizes 2 --families mlp
    python benchmarks/comm_volume.py --mesh                   # FSDP2 x TP on a 2 x 2 mesh, per process group
    python benchmarks/comm_volume.py --mesh --mesh-cases 0,3
"""

from __future__ import annotations

import argparse
import time

from estimator.loader import load_config
from estimator.measure.comm_record import measured_communication
from estimator.measure.distributed import measure_distributed
from estimator.parallel import per_rank_estimate
from estimator.parallel.comm import CommVolume

LLAMA_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 96,
              "max_seq_len": 16, "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "d_ff": 88,
              "bias": False, "tie_embeddings": False}
FAMILIES = {
    # the seed's Cruncher, D=64, 3 layers: 12,352 fp32 parameters
    "mlp": (None, ["model.dim=64", "model.num_layers=3", "optimizer.name=adam", "training.batch_size=4"]),
    # a Llama-like GQA transformer, 2 blocks (rows 32, 88, 96: padded shards at N=3 only)
    "transformer": (LLAMA_LIKE, ["model.num_layers=2", "optimizer.name=adamw", "training.seq_len=16",
                                 "training.batch_size=2"]),
}
GPT2_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "vocab_size": 96, "max_seq_len": 16}
#: 2-D cases, (dp, tp) = (2, 2) on 4 ranks: (label, model, strategy, overrides)
MESH_CASES = [
    ("gpt2-like", GPT2_LIKE, "zero3", ["training.precision=fp32", "optimizer.name=adamw"]),
    ("gpt2-like", GPT2_LIKE, "zero3", ["training.precision=bf16", "optimizer.name=adamw"]),
    ("llama-like GQA", LLAMA_LIKE, "zero3", ["training.precision=fp32", "optimizer.name=adam"]),
    ("llama-like GQA + SP", LLAMA_LIKE, "zero3", ["training.precision=fp32", "optimizer.name=adamw",
                                                  "parallel.sequence_parallel=true"]),
    ("llama-like GQA + SP", LLAMA_LIKE, "zero3", ["training.precision=bf16", "training.master_weights=true",
                                                  "optimizer.name=adamw", "parallel.sequence_parallel=true"]),
    ("llama-like GQA + loss parallel", LLAMA_LIKE, "zero3", ["training.precision=bf16",
                                                             "training.master_weights=true", "optimizer.name=adamw",
                                                             "parallel.loss_parallel=true"]),
    ("llama-like GQA + SP, no reshard", LLAMA_LIKE, "fsdp", ["training.precision=amp-bf16", "optimizer.name=adamw",
                                                             "parallel.sequence_parallel=true",
                                                             "parallel.reshard_after_forward=false"]),
]
STRATEGIES = {"ddp": ("ddp", []), "zero1": ("zero1", []), "zero3": ("zero3", []),
              "fsdp (no reshard)": ("fsdp", ["parallel.reshard_after_forward=false"])}


def _config(family: str, more: list[str]):  # noqa: ANN202
    model, overrides = FAMILIES[family]
    return load_config(None, [*overrides, *more], base={"model": dict(model)} if model else None)


def run_case(family: str, label: str, n: int) -> list[str]:
    """Markdown rows for one case, one per collective kind of the later step."""
    strategy, more = STRATEGIES[label]
    if family == "mlp" and strategy == "fsdp":
        return []  # the mlp family's FSDP2 timeline reshards after forward only (zero3)
    config = _config(family, more)
    start = time.perf_counter()
    measured = measure_distributed(config, strategy, n, timeout=300)
    seconds = time.perf_counter() - start
    rows = []
    estimates = [per_rank_estimate(config, strategy, n, "cpu", m.rank).communication_volume for m in measured]
    got = [measured_communication(m) for m in measured]
    steps_equal = all(getattr(g, s).logical() == getattr(e, s).logical() for g, e in zip(got, estimates, strict=True)
                      for s in ("first_step", "second_step", "steady_step"))
    want = estimates[0].steady_step
    for kind, v in want.kinds:
        meas = {g.steady_step.get(kind) for g in got}
        m = meas.pop() if len(meas) == 1 else None
        shown = f"{m.calls} / {m.input_bytes:,} / {m.output_bytes:,}" if m else "differs by rank"
        rows.append(f"| {family} | {label} | {n} | {kind} | {v.calls} / {v.input_bytes:,} / {v.output_bytes:,} | "
                    f"{shown} | {want.wire_bytes(kind):,} | {'yes' if steps_equal else 'NO'} | {seconds:.0f} s |")
    return rows


def run_mesh_case(index: int) -> list[str]:
    """Markdown rows for one 2 x 2 case, one per (process group, collective kind) of the later step."""
    label, model, strategy, more = MESH_CASES[index]
    config = load_config(None, ["model.num_layers=2", "training.seq_len=16", "training.batch_size=2",
                                "parallel.tp_size=2", *more], base={"model": dict(model)})
    precision = config.training.precision + (" + master" if config.training.master_weights else "")
    start = time.perf_counter()
    measured = measure_distributed(config, strategy, 4, timeout=300)
    seconds = time.perf_counter() - start
    estimates = [per_rank_estimate(config, strategy, 4, "cpu", m.rank) for m in measured]
    got = [measured_communication(m) for m in measured]
    steps = ("first_step", "second_step", "steady_step")
    steps_equal = all(getattr(g, s).logical() == getattr(e.communication_volume, s).logical()
                      for g, e in zip(got, estimates, strict=True) for s in steps)
    memory_equal = all((e.first_step_peak_bytes, e.peak_bytes) == (m.first_step.peak_bytes, m.steady_step.peak_bytes)
                       for e, m in zip(estimates, measured, strict=True))
    want = estimates[0].communication_volume.steady_step
    rows = []
    for g in want.groups:
        for kind, v in g.volume.kinds:
            meas = {(x.steady_step.group(g.name) or CommVolume(g.size)).get(kind) for x in got}
            m = meas.pop() if len(meas) == 1 else None
            shown = f"{m.calls} / {m.input_bytes:,} / {m.output_bytes:,}" if m else "differs by rank"
            rows.append(f"| {label} | {strategy} | {precision} | {g.name} ({g.size}) | {kind} | "
                        f"{v.calls} / {v.input_bytes:,} / {v.output_bytes:,} | {shown} | "
                        f"{g.volume.wire_bytes(kind):,} | {'yes' if steps_equal else 'NO'} | "
                        f"{'yes' if memory_equal else 'NO'} | {seconds:.0f} s |")
    return rows


def main_mesh(cases: list[int]) -> None:
    print("| model | strategy | precision | group (size) | collective | estimated calls / in B / out B (step 3, per "
          "rank) | measured (every rank) | wire B per rank (ring, group size) | steps 1, 2, 3 equal on every rank "
          "| peaks equal | run |")
    print("|---|---|---|---|---|---:|---:|---:|---|---|---:|")
    for i in cases:
        for row in run_mesh_case(i):
            print(row, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--mesh", action="store_true", help="the 2 x 2 FSDP2 x TP cases instead")
    parser.add_argument("--mesh-cases", default=",".join(str(i) for i in range(len(MESH_CASES))))
    args = parser.parse_args(argv)
    if args.mesh:
        main_mesh([int(x) for x in args.mesh_cases.split(",")])
        return
    print("| family | strategy | N | collective | estimated calls / in B / out B (step 3, per rank) | measured "
          "(every rank) | wire B per rank (ring) | steps 1, 2, 3 equal on every rank | run |")
    print("|---|---|---:|---|---:|---:|---:|---|---:|")
    for family in args.families.split(","):
        for label in args.strategies.split(","):
            for n in (int(x) for x in args.world_sizes.split(",")):
                for row in run_case(family, label, n):
                    print(row, flush=True)


if __name__ == "__main__":
    main()
