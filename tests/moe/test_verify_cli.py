"""verify runs a real MoE step and re-estimates with its routing; the CLI states the routing and
refuses bad routing input with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from estimator.loader import validate_config

TINY = {"model": {"family": "moe", "vocab_size": 97, "d_model": 32, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "num_experts": 4, "experts_per_token": 2, "expert_d_ff": 48,
                  "shared_expert_d_ff": 32, "shared_expert_gate": True, "max_seq_len": 64},
        "training": {"batch_size": 2, "seq_len": 32}, "optimizer": {"name": "adamw"}, "device": "cpu"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "estimator", *args], capture_output=True, text=True, timeout=300)


def test_verify_matches_the_real_step_under_measured_routing() -> None:
    """Checkpointed steps are checked against the real step in test_events.py (faster there)."""
    from estimator.measure.verify import run_verify

    ver = run_verify(validate_config(json.loads(json.dumps(TINY))), "cpu")
    rows = {row.key: row for row in ver.rows}
    for key in ("parameters", "gradients", "optimizer_state", "activations", "first_step_peak_bytes",
                "peak_bytes", "flops_matmul"):
        assert rows[key].estimated == rows[key].measured, key
    steady = ver.routing.steady_step
    assert len(steady) == 2 and all(sum(layer) == 2 * 32 * 2 for layer in steady)
    assert ver.estimate.config.model.routing.mode == "measured"
    assert ver.routing.assumed.config.model.routing.mode == "balanced"
    assert "moe_routing" in ver.to_json()


def test_estimate_states_routing_and_active_parameters() -> None:
    out = cli("estimate", "--model", "mixtral-8x7b", "--set", "training.seq_len=4096")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "12,879,925,248 of the 46,702,792,704 are used per token" in text
    assert "balanced routing: B·S·k/E = 8192·2/8 = 2048 tokens per expert" in text
    data = json.loads(cli("estimate", "--model", "mixtral-8x7b", "--set", "training.seq_len=4096", "--json").stdout)
    details = data["model_details"]
    assert details["parameters_active"] == 12_879_925_248 and details["tokens_per_expert"][0] == [2048] * 8


@pytest.mark.parametrize("parallel", ["ddp", "zero2", "zero3"])
def test_per_rank_tables_work_for_moe(parallel: str, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(TINY))
    out = cli("estimate", str(path), "--parallel", parallel, "-n", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert "ranks" in out.stdout or "rank" in out.stdout


def test_bad_routing_is_one_line() -> None:
    out = cli("estimate", "--model", "mixtral-8x7b", "--set", "model.routing.mode=measured")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: model.routing") and len(out.stderr.strip().splitlines()) == 1


def test_set_paths_of_an_moe_hf_config(tmp_path) -> None:  # noqa: ANN001
    """--set model.routing... is checked against the moe family when hf_config names an MoE type."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).resolve().parents[2] / "configs" / "hf" / "olmoe-1b-7b.json", tmp_path / "config.json")
    (tmp_path / "run.yaml").write_text("model:\n  hf_config: config.json\ntraining:\n  seq_len: 64\n")
    args = ["estimate", "run.yaml", "--set", "model.routing.mode=worst", "--set", "model.num_layers=2", "--json"]
    out = subprocess.run([sys.executable, "-m", "estimator", *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model_details"]["routing"] == "worst"
