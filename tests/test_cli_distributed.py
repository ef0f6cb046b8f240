"""estimate/verify --parallel from the command line (real gloo processes for verify)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from estimator.cli import app

runner = CliRunner()
MODEL = ["-o", "adam", "--set", "model.dim=64", "--set", "model.num_layers=3", "-b", "4"]


def test_estimate_parallel_json_lists_ranks() -> None:
    result = runner.invoke(app, ["estimate", *MODEL, "-d", "cpu", "--parallel", "zero1", "-n", "2", "--json"])
    assert result.exit_code == 0, result.output
    dist = json.loads(result.stdout)["distributed"]
    assert dist["strategy"] == "zero1" and dist["world_size"] == 2 and len(dist["ranks"]) == 2
    p = 3 * 64 * 64 + 64
    # ZeRO-1: every rank keeps all parameters and gradients; Adam's state (2 per parameter) is split
    assert all(r["memory"]["parameters"] == 4 * p for r in dist["ranks"])
    assert sum(r["memory"]["optimizer_state"] for r in dist["ranks"]) == 2 * 4 * p


def test_estimate_parallel_table() -> None:
    result = runner.invoke(app, ["estimate", *MODEL, "--parallel", "zero3", "-n", "4"])
    assert result.exit_code == 0, result.output
    assert "Per rank: zero3 on 4 ranks" in result.stdout


def test_unknown_strategy_is_one_line() -> None:
    result = runner.invoke(app, ["estimate", "--parallel", "zero4"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --parallel: unknown strategy 'zero4'")


torch = pytest.importorskip("torch")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_verify_parallel_exact(strategy: str) -> None:
    result = runner.invoke(app, ["verify", *MODEL, "--parallel", strategy, "-n", "2", "--tolerance", "0", "--json"])
    assert result.exit_code == 0, result.output
    ranks = json.loads(result.stdout)["ranks"]
    for rank in ranks:
        for key, pair in rank["comparison"].items():
            assert pair["estimated"] == pair["measured"], (strategy, key, pair)


def test_verify_zero2_is_estimate_only() -> None:
    result = runner.invoke(app, ["verify", *MODEL, "--parallel", "zero2", "-n", "2"])
    assert result.exit_code == 2 and "torch has no implementation to measure" in result.stderr


def test_verify_parallel_needs_the_cpu() -> None:
    result = runner.invoke(app, ["verify", "--parallel", "ddp", "--device", "cuda"])
    assert result.exit_code == 2 and "gloo" in result.stderr
