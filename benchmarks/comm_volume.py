"""Communication volume per rank per step: the estimate against every collective real gloo ranks call.

Each case runs ``verify --parallel``'s harness (N local processes, torch's own DDP,
ZeroRedundancyOptimizer or FSDP2 ``fully_shard``, gloo on the CPU); torch's flight recorder lists each
collective with its input and output tensors (estimator/measure/comm_record.py). Printed per case: the
later (third) step's collectives by kind, estimated and measured (calls, bytes in, bytes out, the same on
every rank or the ranks that differ), the ring's bytes on the wire per rank, and whether the first and
second steps matched too. A markdown table for docs/distributed.md.

    python benchmarks/comm_volume.py                          # strategies x N in {2, 4} x {mlp, transformer}
    python benchmarks/comm_volume.py --world-sizes 2 --families mlp
"""

from __future__ import annotations

import argparse
import time

from estimator.loader import load_config
from estimator.measure.comm_record import measured_communication
from estimator.measure.distributed import measure_distributed
from estimator.parallel import per_rank_estimate

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)
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
