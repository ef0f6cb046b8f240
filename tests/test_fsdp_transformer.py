"""FSDP2 (zero3 / fsdp) for the transformer family: hand-derived shards, the hooks' buffers, a real gloo run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from estimator import load_config
from estimator.cli import app
from estimator.parallel import per_rank_estimate, per_rank_estimates, rank_groups
from estimator.parallel.fsdp import shard_groups, unit_of
from tests.fsdp_ranks import assert_fsdp2_ranks_match

runner = CliRunner()
TINY = {"family": "transformer", "d_model": 16, "num_heads": 2, "vocab_size": 32, "max_seq_len": 8}


def _config(*extra: str):  # noqa: ANN202
    return load_config(None, ["model.num_layers=2", "training.seq_len=8", "training.batch_size=1",
                              "optimizer.name=adam", "training.precision=fp32", *extra], base={"model": dict(TINY)})


def test_units_are_the_blocks_and_the_root() -> None:
    assert unit_of("blocks.3.attn.q_proj.weight") == "blocks.3"
    assert unit_of("tok_emb.weight") == unit_of("norm_f.weight") == "root"


def test_model_states_are_padded_dim0_shards() -> None:
    """Every tensor split along dim 0 into ceil(rows/N) rows. Hand count for d=16, 2 blocks, vocab 32, seq 8:
    tok_emb (32,16) and pos_emb (8,16) split evenly; each block's 16-row tensors and 64-row up_proj too; so
    with N=2 a rank holds exactly half of the 7,232 parameters (28,928 bytes fp32), and Adam's two states."""
    cfg = _config()
    total = 32 * 16 + 8 * 16 + 2 * (4 * 16 + 4 * 16 * 16 + 4 * 16 + 16 * 64 + 64 + 64 * 16 + 16) + 2 * 16
    for r in per_rank_estimates(cfg, "zero3", 2, "cpu"):
        assert r.parameters == r.gradients == total * 4 // 2
        assert r.optimizer_state == 2 * total * 4 // 2


def test_uneven_rows_make_distinct_ranks() -> None:
    """N=3 over 16-row tensors: chunks of 6, 6, 4 rows; the last rank differs, the first two are one group."""
    groups = rank_groups(_config(), "zero3", 3, "cpu")
    assert [g.ranks for g in groups] == [((0, 1),), ((2, 2),)]
    assert shard_groups([], 5) == [(((0, 4),), 0)]


def test_keeping_blocks_gathered_costs_memory() -> None:
    """reshard_after_forward=False keeps every block's parameters gathered from forward to backward."""
    low = per_rank_estimate(_config(), "fsdp", 2, "cpu")
    high = per_rank_estimate(_config("parallel.reshard_after_forward=false"), "fsdp", 2, "cpu")
    assert high.peak_bytes > low.peak_bytes
    assert (high.parameters, high.gradients) == (low.parameters, low.gradients)
    assert per_rank_estimate(_config(), "zero3", 2, "cpu").peak_bytes == low.peak_bytes


def test_parallel_config_section_and_cli_override(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: gpt2}\ntraining: {seq_len: 32}\nparallel: {strategy: zero3, world_size: 4}\n")
    data = json.loads(runner.invoke(app, ["estimate", str(path), "--json"]).stdout)
    assert (data["distributed"]["strategy"], data["distributed"]["world_size"]) == ("zero3", 4)
    assert data["config"]["parallel"]["strategy"] == "zero3"
    data = json.loads(runner.invoke(app, ["estimate", str(path), "-n", "8", "--json"]).stdout)
    assert data["distributed"]["world_size"] == 8
    data = json.loads(runner.invoke(app, ["estimate", str(path), "--parallel", "ddp", "--json"]).stdout)
    assert (data["distributed"]["strategy"], data["distributed"]["world_size"]) == ("ddp", 4)
    bad = runner.invoke(app, ["estimate", "--set", "parallel.strategy=zero4"])
    assert bad.exit_code == 2 and "parallel.strategy" in bad.stderr


def test_fsdp_for_every_preset_answers() -> None:
    """The issue's refusal is gone: zero3 works for presets (transformer and MoE) on any world size."""
    for name in ("llama-2-7b", "gpt2", "mixtral-8x7b"):
        cfg = load_config(None, ["training.seq_len=256"], base={"model": {"preset": name}})
        groups = rank_groups(cfg, "zero3", 1024, "cuda")
        assert sum(g.count for g in groups) == 1024


@pytest.mark.slow
def test_real_fsdp2_ranks_match_to_the_byte() -> None:
    """fully_shard on each block then the root, 2 gloo processes: each rank's figures equal the estimate."""
    assert_fsdp2_ranks_match(_config(), timeout=120)


@pytest.mark.slow
def test_uneven_shards_gather_padded_parameters() -> None:
    """N=3 over 10-row tensors (chunks 4, 4, 2): FSDP2's all-gather output, and so each unsharded parameter's
    storage, is padded to 3 x 4 rows; the last rank holds less state. Real ranks against the estimate."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    from estimator.measure.distributed import measure_distributed

    cfg = load_config(None, ["model.dim=10", "model.num_layers=3", "optimizer.name=adam", "training.batch_size=4"])
    for m in measure_distributed(cfg, "zero3", 3, timeout=120):
        e = per_rank_estimate(cfg, "zero3", 3, "cpu", m.rank)
        assert (m.first_step.peak_bytes, m.steady_step.peak_bytes) == (e.first_step_peak_bytes, e.peak_bytes)
        assert m.optimizer_state == e.optimizer_state


def test_verify_takes_the_config_layout_and_refuses_what_it_cannot_do(tmp_path) -> None:  # noqa: ANN001
    """verify reads the config's parallel: section like --parallel (not silently one device)."""
    path = tmp_path / "c.yaml"
    path.write_text("parallel: {strategy: zero3, world_size: 100000}\n")
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 2 and "--world-size: at most" in result.stderr
    path.write_text("parallel: {strategy: zero3, world_size: 2}\n")
    result = runner.invoke(app, ["verify", str(path), "--timeline"])
    assert result.exit_code == 2 and "--timeline: not available with --parallel" in result.stderr
