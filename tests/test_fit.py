"""estimate --gpu: fit, the largest batch that fits, and the step-time bounds."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from estimator import estimate, load_config
from estimator.cli import app
from estimator.fit import fit_on, largest_batch
from estimator.hardware import CONTEXT_RESERVE, GPUS, get_gpu

runner = CliRunner()


def needed(overrides: list[str]) -> int:
    est = estimate(load_config(overrides=overrides), "cuda")
    return max(est.peak_bytes, est.first_step_peak_bytes) + CONTEXT_RESERVE


def test_seed_example_fits_everywhere_and_needs_peak_plus_reserve() -> None:
    est = estimate(load_config(), "cuda")
    fit = fit_on(est, get_gpu("t4"), 0.4)
    assert fit.fits and fit.needed_bytes == est.peak_bytes + CONTEXT_RESERVE
    assert fit.headroom_bytes == 16 * 2**30 - fit.needed_bytes


def test_largest_batch_is_the_boundary() -> None:
    base = ["model.dim=8192", "model.num_layers=8", "optimizer.name=adam"]
    gpu = get_gpu("a100-40gb")
    best = largest_batch(load_config(overrides=base), gpu)
    assert best > 1
    assert needed([*base, f"training.batch_size={best}"]) <= gpu.memory_bytes
    assert needed([*base, f"training.batch_size={best + 1}"]) > gpu.memory_bytes


def test_model_too_large_for_any_batch() -> None:
    est = estimate(load_config(overrides=["model.preset=llama-2-70b", "training.seq_len=512"]), "cuda")
    fit = fit_on(est, get_gpu("t4"), 0.4)
    assert not fit.fits and fit.max_batch_size == 0


def test_step_time_is_matmul_flops_over_peak() -> None:
    est = estimate(load_config(overrides=["model.preset=gpt2", "training.seq_len=1024", "training.precision=bf16"]),
                   "cuda")
    fit = fit_on(est, get_gpu("h100-sxm"), 0.5)
    assert fit.step_seconds_at_peak == est.flops.matmul / 989e12
    assert fit.step_seconds_at_mfu == fit.step_seconds_at_peak / 0.5
    fp32 = estimate(load_config(overrides=["model.preset=gpt2", "training.seq_len=1024", "training.precision=fp32"]),
                    "cuda")
    assert fit_on(fp32, get_gpu("h100-sxm"), 1.0).step_seconds_at_peak == fp32.flops.matmul / 67e12


def test_cli_gpu_json_and_table() -> None:
    result = runner.invoke(app, ["estimate", "--gpu", "l4", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)["gpu"]
    assert data["name"] == "l4" and data["fits"] is True and data["memory_bytes"] == 24 * 2**30
    table = runner.invoke(app, ["estimate", "--gpu", "a100-80gb", "--model", "llama-2-7b", "-p", "bf16",
                                "--set", "training.seq_len=4096", "-o", "adamw"])
    assert table.exit_code == 0 and "Largest training.batch_size that fits" in table.stdout


def test_unknown_gpu_and_bad_mfu() -> None:
    result = runner.invoke(app, ["estimate", "--gpu", "a100"])
    assert result.exit_code == 2 and "unknown GPU 'a100'; did you mean 'a100-40gb'?" in result.stderr
    result = runner.invoke(app, ["estimate", "--gpu", "t4", "--mfu", "1.5"])
    assert result.exit_code == 2 and "--mfu" in result.stderr


def test_gpus_command_lists_sources() -> None:
    result = runner.invoke(app, ["gpus", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert {r["name"] for r in rows} == set(GPUS) and all("datasheet" in r["source"] for r in rows)
