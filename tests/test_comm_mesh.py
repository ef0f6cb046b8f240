"""Communication volume on a 2-D (dp, tp) mesh: FSDP2's collectives in the dp group and TP's in the tp group,
each with its own size in the ring factors (estimator/parallel/comm.py ``MeshVolume``); the flight recorder's
calls kept by group; one tiny real 2 x 2 run (with SP and a checkpointed block, so it also checks TP's
recomputation: tests/test_tp_checkpointing.py) compared group by group in every step."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from estimator import load_config
from estimator.cli import app
from estimator.measure.comm_record import Collective, collective_of, volume, volume_from_json
from estimator.parallel import per_rank_estimate
from estimator.parallel.comm import CommVolume, KindVolume, MeshVolume

runner = CliRunner()
LLAMA_LIKE = {"family": "transformer", "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 96,
              "max_seq_len": 16, "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "d_ff": 88,
              "bias": False, "tie_embeddings": False}


def _config(*extra: str):  # noqa: ANN202
    return load_config(None, ["model.num_layers=2", "training.seq_len=16", "training.batch_size=2",
                              "optimizer.name=adam", "training.precision=fp32", "parallel.tp_size=2", *extra],
                       base={"model": dict(LLAMA_LIKE)})


def test_two_d_volume_by_hand_on_gloo() -> None:
    """Llama-like, 2 blocks, fp32, zero3 on (dp, tp) = (2, 2), T = 32 tokens, d = 32. A rank's TP-local tensors
    are 59,008 B, its dp shards 29,504 B (rows 32, 88, 96 / 2: no padding). dp: 2 blocks and the root each
    gathered before forward and again before backward (wrap_tp passes reshard_after_forward to the root), 6
    gathers handing over 2 x 29,504 and filling 2 x 59,008 B; 3 reduce-scatters, each on gloo an all-reduce of
    the unit's whole 2-shard input: 59,008 B. tp: as TP alone (docs/tp.md), 16 all-reduces of T·d·4 = 4,096 B
    and the logits' all-gather, T·V/2·4 = 6,144 -> 12,288 B. Wire per rank, each group N = 2: dp
    59,008/2 + 2·59,008/2, tp 65,536 + 6,144."""
    volume = per_rank_estimate(_config(), "zero3", 4, "cpu", 3).communication_volume
    step = volume.steady_step
    assert isinstance(step, MeshVolume) and [(g.name, g.size) for g in step.groups] == [("dp", 2), ("tp", 2)]
    assert step.logical() == {"dp:all_reduce": (3, 59_008, 59_008), "dp:all_gather": (6, 59_008, 118_016),
                              "tp:all_reduce": (16, 65_536, 65_536), "tp:all_gather": (1, 6_144, 12_288)}
    assert step.group("dp").wire_bytes() == 59_008 + 59_008 and step.group("tp").wire_bytes() == 65_536 + 6_144
    assert step.wire_bytes() == 189_696 and step.size_bytes == 59_008 + 118_016 + 65_536 + 12_288
    assert volume.first_step == volume.second_step == step


def test_two_d_volume_on_cuda_and_with_sequence_parallelism() -> None:
    """On NCCL the dp reduce-scatters are reduce-scatters (output one shard: 29,504 B, wire (N-1)/N of the
    59,008 B input). Under SP the 5 norm weights' Partial gradients (d·4 = 128 B each) are all-reduced once per
    backward in the tp group by FSDP2's post-backward, not at each of Adam's reads in optimizer.step() as
    under TP alone (15 there)."""
    step = per_rank_estimate(_config(), "zero3", 4, "cuda", 0).communication_volume.steady_step
    assert step.group("dp").get("reduce_scatter") == KindVolume(3, 59_008, 29_504)
    assert step.group("dp").wire_bytes("reduce_scatter") == 29_504
    sp = per_rank_estimate(_config("parallel.sequence_parallel=true"), "zero3", 4, "cpu", 0)
    tp = sp.communication_volume.steady_step.group("tp")
    alone = per_rank_estimate(load_config(None, ["model.num_layers=2", "training.seq_len=16", "training.batch_size=2",
                                                 "optimizer.name=adam", "training.precision=fp32",
                                                 "parallel.sequence_parallel=true"],
                                          base={"model": dict(LLAMA_LIKE)}), "tp", 2, "cpu")
    one_d = alone.communication_volume.steady_step.get("all_reduce")
    assert tp.get("all_reduce") == KindVolume(one_d.calls - 15 + 5, one_d.input_bytes - 10 * 128,
                                              one_d.output_bytes - 10 * 128)


def test_mesh_volume_json_and_table() -> None:
    """JSON: the groups' sizes, by_group with each group's kinds, totals summed over the groups; the table's
    rows name the group and its size."""
    args = ["estimate", "--model", "llama-2-7b", "-b", "1", "--set", "training.seq_len=128", "--parallel", "zero3",
            "-n", "8", "--tp", "2"]
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)["distributed"]["ranks"][0]["communication_volume"]
    assert data["groups"] == {"dp": 4, "tp": 2}
    steady = data["steady_step"]
    assert set(steady["by_group"]) == {"dp", "tp"} and steady["by_group"]["dp"]["group_size"] == 4
    assert steady["wire_bytes"] == sum(g["wire_bytes"] for g in steady["by_group"].values())
    assert steady["by_kind"]["all_gather"]["calls"] == sum(g["by_kind"]["all_gather"]["calls"]
                                                           for g in steady["by_group"].values())
    table = runner.invoke(app, args, env={"COLUMNS": "200"}).stdout
    assert "dp groups of 4" in table and "all_gather (dp, 4 ranks)" in table and "all_reduce (tp, 2 ranks)" in table


def test_recorder_groups_and_gathers() -> None:
    """A recorder entry's mesh group (``mesh_tp``) and size are kept; the default group's calls stay 1-D; an
    all-gather the recorder wrote with its input's size is n times its input (the functional all-gather)."""
    entry = {"profiling_name": "gloo:all_reduce", "input_sizes": [[8]], "input_dtypes": ["Float"],
             "output_sizes": [[8]], "output_dtypes": ["Float"], "is_p2p": False,
             "process_group": ["3", "mesh_tp"]}
    assert collective_of(entry, 2) == Collective("all_reduce", 32, 32, "tp", 2)
    assert collective_of({**entry, "process_group": ["0", "default_pg"]}, 4) == Collective("all_reduce", 32, 32)
    gather = Collective("all_gather", 24, 24, "tp", 2)
    mixed = volume([gather, Collective("all_reduce", 32, 32, "dp", 2)], 4)
    assert mixed.logical() == {"dp:all_reduce": (1, 32, 32), "tp:all_gather": (1, 24, 48)}
    assert volume([Collective("all_gather", 24, 24)], 4).logical() == {"all_gather": (1, 24, 96)}
    kept = [["all_gather", 24, 24, "tp", 2], ["all_reduce", 32, 32, "dp", 2]]
    assert volume_from_json(kept, 4) == mixed
    assert isinstance(volume_from_json([["all_reduce", 32, 32]], 2), CommVolume)


@pytest.mark.slow
def test_real_two_d_ranks_equal_the_estimate_by_group() -> None:
    """4 gloo processes, (dp, tp) = (2, 2), a 1-block llama-like model with SP and activation checkpointing in
    fp32: every rank's collectives in each group (the recomputed forward's included) equal the estimate in
    steps 1, 2 and 3, and so do the model states and the peaks."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    from estimator.measure.comm_record import measured_communication
    from estimator.measure.distributed import measure_distributed

    config = load_config(None, ["model.num_layers=1", "training.seq_len=8", "training.batch_size=1",
                                "optimizer.name=adamw", "training.precision=fp32", "parallel.tp_size=2",
                                "parallel.sequence_parallel=true", "training.activation_checkpointing=full"],
                       base={"model": dict(LLAMA_LIKE)})
    for m in measure_distributed(config, "zero3", 4, timeout=300):
        want = per_rank_estimate(config, "zero3", 4, "cpu", m.rank)
        got = measured_communication(m)
        assert got is not None and isinstance(got.steady_step, MeshVolume)
        for step in ("first_step", "second_step", "steady_step"):
            assert getattr(got, step).logical() == getattr(want.communication_volume, step).logical(), (m.rank, step)
        assert (m.parameters, m.gradients, m.optimizer_state) == (want.parameters, want.gradients,
                                                                  want.optimizer_state)
        assert (m.first_step.peak_bytes, m.steady_step.peak_bytes) == (want.first_step_peak_bytes, want.peak_bytes)
