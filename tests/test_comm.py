"""Communication volume per rank per step (estimator/parallel/comm.py): hand-derived counts, the ring's
bytes on the wire, accumulation, the JSON and the tables. The real gloo runs are in test_comm_real.py."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from estimator import load_config
from estimator.cli import app
from estimator.measure.comm_record import Collective, collective_of, volume
from estimator.parallel import per_rank_estimate, rank_groups
from estimator.parallel.comm import (
    CommParts,
    CommVolume,
    KindVolume,
    collective_dtypes,
    ring_factor,
    step_communication,
)

runner = CliRunner()
TINY = {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 32, "max_seq_len": 8}


def _seed(*extra: str):  # noqa: ANN202
    """The seed's Cruncher: D=4, 2 layers: 16 + 16 + 4 = 36 fp32 parameters, 144 bytes."""
    return load_config(None, list(extra))


def _tiny(*extra: str):  # noqa: ANN202
    return load_config(None, ["model.num_layers=2", "training.seq_len=8", "training.batch_size=1",
                              "optimizer.name=adam", "training.precision=fp32", *extra], base={"model": dict(TINY)})


def _steady(config, strategy: str, n: int, device: str = "cpu", rank: int = 0) -> CommVolume:  # noqa: ANN001
    volume = per_rank_estimate(config, strategy, n, device, rank).communication_volume
    assert volume is not None
    return volume.steady_step


def test_ring_factors() -> None:
    """Patarasuk & Yuan 2009 / NCCL's bus-bandwidth factors."""
    assert ring_factor("all_reduce", 4) == Fraction(3, 2)
    assert ring_factor("all_gather", 4) == ring_factor("reduce_scatter", 4) == Fraction(3, 4)
    assert ring_factor("broadcast", 4) == ring_factor("reduce", 4) == 1
    assert ring_factor("all_reduce", 1) == ring_factor("broadcast", 1) == 0
    with pytest.raises(ValueError):
        ring_factor("gossip", 2)


def test_ddp_one_bucket_and_the_rebuild() -> None:
    """One bucket (144 B < 1 MiB): one all-reduce of 144 B per step; on 2 ranks a ring sends 2·1/2·144 = 144 B.
    The second step's rebuild broadcasts (3 + 1) int32 indices and 1 int32 bucket size: 2 calls, 20 B."""
    v = per_rank_estimate(_seed(), "ddp", 2, "cpu").communication_volume
    assert v.first_step.logical() == v.steady_step.logical() == {"all_reduce": (1, 144, 144)}
    assert v.second_step.logical() == {"all_reduce": (1, 144, 144), "broadcast": (2, 20, 20)}
    assert v.steady_step.wire_bytes() == 144
    assert _steady(_seed(), "ddp", 4).wire_bytes() == 216  # 2·3/4·144


def test_ddp_buckets_split_at_the_caps() -> None:
    """D=512, 4 layers: 1 MiB per layer; in reverse order the head (2 KiB) and layer 3 close the first bucket
    (>= 1 MiB), layers 2, 1, 0 (3 MiB) stay under 25 MiB: two all-reduces, 4·(4·512² + 512) bytes."""
    v = _steady(_seed("model.dim=512", "model.num_layers=4"), "ddp", 8)
    assert v.logical() == {"all_reduce": (2, 4 * (4 * 512 * 512 + 512), 4 * (4 * 512 * 512 + 512))}


def test_zero1_broadcasts_every_parameter_once() -> None:
    """ZeroRedundancyOptimizer broadcasts each of the 3 tensors from its owner: 144 B, on every rank."""
    for n in (2, 3, 5):
        for g in rank_groups(_seed(), "zero1", n, "cpu"):
            assert g.communication_volume.steady_step.logical() == {"all_reduce": (1, 144, 144),
                                                                     "broadcast": (3, 144, 144)}


def test_zero2_reduces_and_broadcasts() -> None:
    """Estimate only: one reduce per gradient to its owner, then ZeRO-1's broadcasts; 2Ψ on the wire."""
    v = _steady(_seed(), "zero2", 4)
    assert v.logical() == {"reduce": (3, 144, 144), "broadcast": (3, 144, 144)}
    assert v.wire_bytes() == 288


def test_zero3_units_gathered_twice_and_reduced() -> None:
    """N=2: layers (4,4) -> 2-row chunks of 8 elements, the head (4,1) -> 2 elements: a forward gathers
    18 elements per rank (72 B in, 144 B out), the backward the two layers again (64 B in; the root, left
    to FSDP2's default, stays gathered); 3 reduce-scatters of the full 144 B. On gloo those are all-reduces
    of the whole input; on NCCL reduce-scatters that keep 72 B."""
    cpu = _steady(_seed(), "zero3", 2, "cpu")
    assert cpu.logical() == {"all_reduce": (3, 144, 144), "all_gather": (5, 136, 272)}
    cuda = _steady(_seed(), "zero3", 2, "cuda")
    assert cuda.logical() == {"reduce_scatter": (3, 144, 72), "all_gather": (5, 136, 272)}
    assert cuda.wire_bytes("all_gather") == 136 and cuda.wire_bytes("reduce_scatter") == 72


def test_zero3_uneven_padding_is_the_same_on_every_rank() -> None:
    """D=10, N=3: ceil(10/3) = 4-row chunks: 40 + 40 + 4 elements per rank per gather, padded on the last
    rank too; the layers gathered twice, the root once (656 B in / 1,968 B out), the all-reduces
    3 x 84 x 4 = 1,008 B."""
    groups = rank_groups(_seed("model.dim=10"), "zero3", 3, "cpu")
    assert len(groups) == 2  # the last rank holds fewer rows ...
    for g in groups:  # ... but hands over the same padded bytes
        assert g.communication_volume.steady_step.logical() == {"all_reduce": (3, 1008, 1008),
                                                                  "all_gather": (5, 656, 1968)}


def test_fsdp_without_resharding_gathers_once() -> None:
    """reshard_after_forward=false: every unit all-gathered once (forward only); true: the blocks twice,
    the root (FSDP2's default for it) once."""
    keep = _steady(_tiny("parallel.reshard_after_forward=false"), "fsdp", 2)
    reshard = _steady(_tiny(), "fsdp", 2)
    assert keep.get("all_gather").calls == 3 and reshard.get("all_gather").calls == 5
    root = (32 * 16 + 8 * 16 + 2 * 16) * 4  # tok_emb, pos_emb, norm_f: gathered in forward only either way
    assert 2 * keep.get("all_gather").output_bytes - root == reshard.get("all_gather").output_bytes
    assert keep.get("all_reduce") == reshard.get("all_reduce")


def test_zero3_is_three_psi_on_the_wire() -> None:
    """ZeRO section 7.2.2: ZeRO-3 moves 3Ψ per rank against DDP's 2Ψ, when every row count divides by N
    (no padding): d=16 blocks, vocab 32, seq 8 on 8 ranks, 7,232 fp32 parameters; FSDP2 keeps the root
    (672 parameters) gathered from its forward to its backward, so 3Ψ less one gather of the root."""
    psi, root = 7232 * 4, 672 * 4
    n = 8
    z3, ddp = _steady(_tiny(), "zero3", n, "cuda"), _steady(_tiny(), "ddp", n, "cuda")
    assert z3.wire_bytes() == round(Fraction((3 * psi - root) * (n - 1), n))
    assert ddp.wire_bytes() == round(Fraction(2 * psi * (n - 1), n))


def test_bf16_halves_the_bytes() -> None:
    half = _steady(_tiny("training.precision=bf16"), "zero3", 2)
    assert half.size_bytes * 2 == _steady(_tiny(), "zero3", 2).size_bytes
    assert collective_dtypes(_tiny("training.precision=amp-bf16"), "zero3").parameter_bytes == 4  # fp32 weights


def test_master_weights_gather_16_bit_and_reduce_in_reduce_dtype() -> None:
    """FSDP2 MixedPrecisionPolicy: the fp32 shard cast to bf16 for the all-gather; the reduce-scatter in
    parallel.reduce_dtype (fp32, or the param dtype). DDP with a master copy all-reduces the bf16 gradients."""
    fp32 = _steady(_tiny(), "zero3", 2)
    mixed = _steady(_tiny("training.precision=bf16", "training.master_weights=true"), "zero3", 2)
    assert mixed.get("all_gather").output_bytes * 2 == fp32.get("all_gather").output_bytes
    assert mixed.get("all_reduce") == fp32.get("all_reduce")
    param = _steady(_tiny("training.precision=bf16", "training.master_weights=true", "parallel.reduce_dtype=param"),
                    "zero3", 2)
    assert param.get("all_reduce").input_bytes * 2 == fp32.get("all_reduce").input_bytes
    ddp = _steady(_tiny("training.precision=bf16", "training.master_weights=true"), "ddp", 2)
    assert ddp.get("all_reduce").input_bytes * 2 == _steady(_tiny(), "ddp", 2).get("all_reduce").input_bytes


def test_accumulation_repeats_what_each_micro_batch_does() -> None:
    """4 micro-batches: the gathers 4 times; the gradient sync 4 times, or once without per-micro-batch sync;
    the optimizer's broadcasts once."""
    n = 2
    parts = CommParts(CommVolume.of(n, {"all_gather": KindVolume(2, 10, 20)}),
                      CommVolume.of(n, {"reduce_scatter": KindVolume(1, 20, 10)}),
                      CommVolume.of(n, {"broadcast": KindVolume(3, 7, 7)}), CommVolume(n))
    for sync, rs in ((True, 4), (False, 1)):
        cfg = SimpleNamespace(training=SimpleNamespace(grad_accum_steps=4),
                              parallel=SimpleNamespace(sync_every_micro_batch=sync))
        step = step_communication(cfg, parts).steady_step  # type: ignore[arg-type]
        assert step.logical() == {"reduce_scatter": (rs, 20 * rs, 10 * rs), "all_gather": (8, 40, 80),
                                  "broadcast": (3, 7, 7)}


def test_accumulation_in_the_config() -> None:
    """training.grad_accum_steps=3 (every micro-batch syncs, as the harness runs it): DDP all-reduces 3 times per
    step, and its bucket rebuild happens at the run's second forward, in the first step; ZeRO-1 broadcasts once;
    FSDP2 gathers and reduces per micro-batch."""
    cfg = _seed("training.grad_accum_steps=3")
    v = per_rank_estimate(cfg, "ddp", 2, "cpu").communication_volume
    assert v.first_step.logical() == {"all_reduce": (3, 432, 432), "broadcast": (2, 20, 20)}
    assert v.second_step.logical() == v.steady_step.logical() == {"all_reduce": (3, 432, 432)}
    assert _steady(cfg, "zero1", 2).get("broadcast") == KindVolume(3, 144, 144)
    one, three = _steady(_tiny(), "zero3", 2), _steady(_tiny("training.grad_accum_steps=3"), "zero3", 2)
    assert three == one.times(3)


def test_recorder_entries_become_volumes() -> None:
    """What the flight recorder writes for gloo, read back (names and dtypes as torch 2.13 writes them)."""
    entry = {"profiling_name": "gloo:all_reduce", "input_sizes": [[36]], "input_dtypes": ["Float"],
             "output_sizes": [[36]], "output_dtypes": ["Float"], "is_p2p": False}
    assert collective_of(entry) == Collective("all_reduce", 144, 144)
    gather = {**entry, "profiling_name": "gloo:all_gather", "input_sizes": [[1]], "input_dtypes": ["Long"],
              "output_sizes": [[2, 1]], "output_dtypes": ["Long"]}
    assert collective_of(gather) == Collective("all_gather", 8, 16)
    assert collective_of({**entry, "profiling_name": "gloo:barrier"}) is None
    v = volume([Collective("all_reduce", 144, 144), Collective("all_reduce", 4, 4)], 2)
    assert v.logical() == {"all_reduce": (2, 148, 148)}


def test_json_and_table(tmp_path) -> None:  # noqa: ANN001
    result = runner.invoke(app, ["estimate", "--parallel", "zero3", "-n", "2", "--json"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["distributed"]["ranks"][0]["communication_volume"]
    assert entry["world_size"] == 2 and "ring" in entry["convention"]
    assert entry["steady_step"]["by_kind"]["all_gather"] == {"calls": 5, "input_bytes": 136, "output_bytes": 272,
                                                             "size_bytes": 272, "wire_bytes": 136}
    table = runner.invoke(app, ["estimate", "--parallel", "zero1", "-n", "4"])
    assert table.exit_code == 0
    assert "Communication per step, every rank (N=4)" in table.stdout and "sent/step" in table.stdout


def test_communication_stays_cheap_at_scale() -> None:
    """Computed once per context from the parameter list (not per rank or per event): llama-2-70b under fsdp
    on 1,024 ranks adds little to the rank groups."""
    cfg = load_config(None, ["model.preset=llama-2-70b", "training.precision=bf16"])
    from estimator.parallel import comm
    from estimator.parallel.base import RankContext
    from estimator.parallel.fsdp import fsdp_communication

    ctx = RankContext(cfg, 1024, "cuda")
    start = time.perf_counter()
    parts = fsdp_communication(ctx, "fsdp", True)
    elapsed = time.perf_counter() - start
    step = comm.step_communication(cfg, parts).steady_step
    assert step.get("all_gather").calls == 2 * 80 + 1 and step.get("reduce_scatter").calls == 81
    assert elapsed < 1.0


def test_verify_rows_compare_the_recorded_calls() -> None:
    """verify --parallel's rows: S summed per step and the later step's calls, estimated vs recorded; a missing
    collective shows as a difference (the tolerance check then names it)."""
    from estimator.report import communication_rows

    est = per_rank_estimate(_seed(), "ddp", 2, "cpu")
    step = [["all_reduce", 144, 144]]
    rebuild = [*step, ["broadcast", 16, 16], ["broadcast", 4, 4]]
    measured = SimpleNamespace(world_size=2, communication={"setup": [], "first_step": step, "second_step": rebuild,
                                                            "third_step": step})
    rows = {r.key: (r.estimated, r.measured) for r in communication_rows(est, measured)}
    assert rows == {"communication_first_step_bytes": (144, 144), "communication_second_step_bytes": (164, 164),
                    "communication_steady_step_bytes": (144, 144), "communication_steady_step_calls": (1, 1)}
    short = SimpleNamespace(world_size=2, communication={**measured.communication, "third_step": []})
    assert [r.key for r in communication_rows(est, short) if not r.within(0.0)] == [
        "communication_steady_step_bytes", "communication_steady_step_calls"]
    assert communication_rows(est, SimpleNamespace(world_size=2, communication={})) == []


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 40), layers=st.integers(1, 5), n=st.integers(1, 9),
       precision=st.sampled_from(["fp32", "bf16"]))  # amp: the mlp zero3 timeline refuses it (one line)
def test_totals_follow_the_parameters(dim: int, layers: int, n: int, precision: str) -> None:
    """Whatever the shape: DDP all-reduces G_b·Ψ and ZeRO-1 broadcasts P_b·Ψ per step on every rank; FSDP2
    gathers each layer twice and the root (the head) once, N times its padded chunk; ring bytes never exceed 2S."""
    cfg = _seed(f"model.dim={dim}", f"model.num_layers={layers}", f"training.precision={precision}")
    b = 2 if precision == "bf16" else 4
    assert collective_dtypes(_seed("training.precision=amp-bf16"), "zero3") == collective_dtypes(_seed(), "zero3")
    psi = dim * dim * layers + dim
    assert _steady(cfg, "ddp", n).get("all_reduce").input_bytes == b * psi
    assert _steady(cfg, "zero1", n).get("broadcast") == KindVolume(layers + 1, b * psi, b * psi)
    z3 = _steady(cfg, "zero3", n, "cuda")
    chunk = -(-dim // n)
    assert z3.get("all_gather") == KindVolume(2 * layers + 1, b * chunk * (2 * dim * layers + 1),
                                              n * b * chunk * (2 * dim * layers + 1))
    assert z3.get("reduce_scatter").output_bytes * n == z3.get("reduce_scatter").input_bytes
    for v in (z3, _steady(cfg, "ddp", n), _steady(cfg, "zero2", n)):
        assert 0 <= v.wire_bytes() <= 2 * v.size_bytes
