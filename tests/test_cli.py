"""The CLI as a user runs it: through Typer's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from estimator.cli import app

runner = CliRunner()


def run_json(*args: str) -> object:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_estimate_default_is_the_seed_example() -> None:
    data = run_json("estimate", "--json")
    assert data["parameters"] == 36
    assert data["memory"]["total"] == 496
    assert data["flops"] == {"per_step": 432, "forward": 144, "backward": 288, "matmul": 368,
                             "matmul_forward": 144, "attention": 0, "matmul_optimizer": 0,
                             "rule_tokens": 2, "rule_parameters": 36}
    assert data["optimizer"] == "adagrad" and data["device"] == "cuda"


def test_estimate_table_shows_every_term() -> None:
    result = runner.invoke(app, ["estimate", "--device", "cpu"])
    assert result.exit_code == 0
    for text in ("parameters", "activations", "gradients", "optimizer state", "496", "628", "432", "368"):
        assert text in result.stdout, text


def test_shortcuts_and_set(configs_dir: Path) -> None:
    data = run_json("estimate", str(configs_dir / "cruncher-large.yaml"), "--optimizer", "adam", "--batch-size", "64",
                    "--json")
    assert data["config"]["training"]["batch_size"] == 64
    p = 4096 * 4096 * 4 + 4096
    assert data["parameters"] == p and data["memory"]["optimizer_state"] == 8 * p
    data = run_json("estimate", str(configs_dir / "cruncher.yaml"), "--set", "optimizer.name=rmsprop",
                    "--set", "training.precision=bf16", "--json")
    assert data["optimizer"] == "rmsprop" and data["precision"] == "bf16"
    assert data["memory"]["parameters"] == 36 * 2 and data["memory"]["optimizer_state"] == 36 * 2


def test_set_wins_over_shortcut() -> None:
    data = run_json("estimate", "-b", "4", "--set", "training.batch_size=8", "--json")
    assert data["config"]["training"]["batch_size"] == 8


def test_json_config_file(configs_dir: Path) -> None:
    data = run_json("estimate", str(configs_dir / "cruncher-amp.json"), "--json")
    assert data["precision"] == "amp-bf16" and data["implementation"] == "foreach"


def test_compare_json_lists_every_optimizer(configs_dir: Path) -> None:
    names = ["sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw"]
    data = run_json("compare", str(configs_dir / "cruncher.yaml"), "--optimizers", ",".join(names), "--json")
    assert [d["optimizer"] for d in data] == names
    assert [d["memory"]["optimizer_state"] // 144 for d in data] == [0, 1, 1, 1, 2, 2]


def test_compare_table() -> None:
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 0 and "adamw" in result.stdout and "1st peak" in result.stdout


def test_optimizers_lists_registry() -> None:
    result = runner.invoke(app, ["optimizers"])
    assert result.exit_code == 0
    for name in ("sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "lion", "adafactor", "adam8bit"):
        assert name in result.stdout
    data = run_json("optimizers", "--json")
    assert {d["name"] for d in data} >= {"adam", "lion"}
    assert next(d for d in data if d["name"] == "adam")["state"].startswith("exp_avg, exp_avg_sq")


def test_schema_is_json_schema() -> None:
    schema = run_json("schema")
    assert schema["type"] == "object"
    assert set(schema["properties"]) >= {"model", "training", "optimizer"}
    assert schema["additionalProperties"] is False


def test_timeline_draws_phases() -> None:
    result = runner.invoke(app, ["estimate", "--timeline", "--device", "cpu", "-o", "adam"])
    assert result.exit_code == 0
    assert "live bytes over a steady step" in result.stdout and "optimizer_step" in result.stdout


def test_subprocess_estimate_never_imports_torch() -> None:
    code = (
        "import sys, runpy\n"
        "sys.argv = ['estimator', 'estimate', '--json']\n"
        "try:\n    runpy.run_module('estimator', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["memory"]["total"] == 496


def test_python_dash_m_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "estimator", "estimate", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["parameters"] == 36


def test_models_lists_presets_with_published_counts() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "gpt2" in result.stdout and "124,439,808" in result.stdout and "6,738,415,616" in result.stdout
    rows = run_json("models", "--json")
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b", "llama-2-13b",
                            "llama-3-8b", "mistral-7b"}
    assert all(r["parameters"] == r["published"] for r in rows)


def test_model_preset_shortcut() -> None:
    data = run_json("estimate", "--model", "llama-2-7b", "--set", "training.seq_len=512", "-b", "1", "--json")
    assert data["parameters"] == 6_738_415_616
    assert data["config"]["model"]["family"] == "transformer"


def test_unknown_preset_suggests_closest() -> None:
    result = runner.invoke(app, ["estimate", "--model", "gpt-2"])
    assert result.exit_code == 2 and "gpt2" in result.stderr and result.stderr.startswith("error: ")
