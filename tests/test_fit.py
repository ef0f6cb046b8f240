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


# --- the largest-batch search (issue 8: no re-simulation from scratch for every candidate) -------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from estimator.fit import search_batch, step_peak  # noqa: E402


@settings(max_examples=400, deadline=None)
@given(base=st.integers(0, 100), slopes=st.lists(st.integers(0, 9), min_size=1, max_size=4),
       kinks=st.lists(st.integers(1, 400), min_size=3, max_size=3), step=st.integers(1, 600),
       budget=st.integers(0, 5000), cap=st.sampled_from([1, 2, 5, 64, 1000]))
def test_search_finds_the_boundary_of_any_nondecreasing_peak(base: int, slopes: list[int], kinks: list[int],
                                                              step: int, budget: int, cap: int) -> None:
    """Convex pieces (max of affine), and a staircase on top (CUDA's 512-byte rounding): a linear scan agrees."""
    def peak(b: int) -> int:
        value = base + sum(s * max(0, b - k) for s, k in zip(slopes, [0, *kinks], strict=False))
        return value + (-(-value // step) * step - value)  # rounded up to `step`, still nondecreasing

    want = max((b for b in range(1, cap + 1) if peak(b) <= budget), default=0)
    got, capped = search_batch(peak, budget, cap)
    assert got == want
    assert capped == (want == cap)


def test_fit_under_parallel_judges_the_worst_rank() -> None:
    """The issue's wrong answer: the verdict was the single-device peak; now the worst rank's, named."""
    cfg = load_config(overrides=["model.preset=llama-2-7b", "training.seq_len=1024", "optimizer.name=adamw",
                                 "training.precision=amp-bf16", "training.batch_size=1"])
    est = estimate(cfg, "cuda")
    for strategy, n in (("zero2", 8), ("zero1", 2), ("ddp", 2)):
        fit = fit_on(est, get_gpu("a100-80gb"), 0.4, strategy, n)
        peak, ranks = step_peak(cfg, strategy, n)
        assert fit.peak_bytes == peak and fit.worst_ranks == ranks
        assert fit.fits == (peak + CONTEXT_RESERVE <= get_gpu("a100-80gb").memory_bytes)
    single = fit_on(est, get_gpu("a100-80gb"), 0.4)
    assert fit_on(est, get_gpu("a100-80gb"), 0.4, "zero2", 8).peak_bytes < single.peak_bytes


def test_search_cap_is_said_to_be_a_cap() -> None:
    """Issue 12 item 15: the seed's tiny model fits any batch up to the search cap; the answer says 'at least'."""
    result = runner.invoke(app, ["estimate", "--gpu", "h100-sxm", "--json"])
    data = json.loads(result.stdout)["gpu"]
    assert data["max_batch_size_is_search_cap"] is True and data["max_batch_size"] == 1 << 24
    table = runner.invoke(app, ["estimate", "--gpu", "h100-sxm"])
    assert "at least 16,777,216" in table.stdout


def test_verdict_is_worst_rank_plus_reserve_over_a_grid() -> None:
    """Issue 9's bar: in every --gpu --parallel combination, fits == (worst-rank peak + reserve <= memory)."""
    from estimator.parallel import rank_groups

    for preset in ("gpt2", "llama-2-7b"):
        cfg = load_config(overrides=[f"model.preset={preset}", "training.seq_len=256", "training.batch_size=2"])
        est = estimate(cfg, "cuda")
        for gpu_name in ("t4", "a100-80gb"):
            gpu = get_gpu(gpu_name)
            for strategy, n in (("ddp", 4), ("zero1", 4), ("zero2", 4), ("zero3", 4), ("zero3", 64), ("fsdp", 8)):
                fit = fit_on(est, gpu, 0.4, strategy, n, suggest=False)
                groups = rank_groups(cfg, strategy, n, "cuda")
                worst = max(max(g.estimate.peak_bytes, g.estimate.first_step_peak_bytes) for g in groups)
                assert fit.peak_bytes == worst
                assert fit.fits == (worst + CONTEXT_RESERVE <= gpu.memory_bytes), (preset, gpu_name, strategy, n)


def test_alternatives_are_re_estimated() -> None:
    """Llama-2-7B with AdamW does not fit one A100-80GB; each alternative's need is its own worst-rank peak."""
    cfg = load_config(overrides=["model.preset=llama-2-7b", "training.seq_len=512", "optimizer.name=adamw",
                                 "training.precision=amp-bf16", "training.batch_size=1"])
    fit = fit_on(estimate(cfg, "cuda"), get_gpu("a100-80gb"), 0.4)
    assert not fit.fits and fit.alternatives
    changes = {a.change: a for a in fit.alternatives}
    bf16 = changes["-p bf16"]
    assert bf16.needed_bytes == step_peak(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"precision": "bf16"})}))[0] + CONTEXT_RESERVE
    smallest = [a for a in fit.alternatives if a.change.startswith("--parallel zero3 -n") and a.fits]
    assert smallest, "a world size under zero3 that fits"
    n = int(smallest[-1].change.rsplit(" ", 1)[1].replace(",", ""))
    assert step_peak(cfg, "zero3", n // 2)[0] + CONTEXT_RESERVE > get_gpu("a100-80gb").memory_bytes


def test_model_state_floor_is_below_the_peak_at_a_batch_of_one() -> None:
    """The parameter, gradient and optimizer-state bytes live at a peak do not depend on the batch: their sum, read
    off the step at the config's batch, is at most the peak at a batch of 1, on one device and on every rank."""
    from estimator.fit import _with_batch, model_state_floor, step_peak

    for preset, precision in (("llama-2-7b", "amp-bf16"), ("pythia-160m", "bf16"), ("mixtral-8x7b", "bf16")):
        cfg = load_config(overrides=[f"model.preset={preset}", f"training.precision={precision}",
                                     "training.batch_size=3", "training.seq_len=256", "model.num_layers=5"])
        for layout in (None, ("zero2", 3), ("zero3", 4), ("ddp", 2), ("tp", 2)):
            strategy, n = layout or (None, 1)
            if strategy == "tp" and preset == "mixtral-8x7b":
                continue  # tensor parallelism is modelled for the transformer family
            floor = model_state_floor(cfg, strategy, n)
            assert 0 < floor <= step_peak(_with_batch(cfg, 1), strategy, n)[0], (preset, layout)


def test_no_batch_fits_when_the_model_states_alone_do_not(monkeypatch) -> None:  # noqa: ANN001
    """Llama-2-7B's fp32 weights and AdamW state (16 bytes a parameter) are over a T4's 16 GiB: the largest batch is
    0 without simulating a batch of 1, on one device and under ZeRO-2."""
    from estimator import affine_batch, fit
    from estimator.simulate import clear_caches

    cfg = load_config(overrides=["model.preset=llama-2-7b", "training.precision=amp-bf16"])
    gpu = get_gpu("t4")
    budget = gpu.memory_bytes - CONTEXT_RESERVE
    for strategy, n in ((None, 1), ("zero2", 2)):
        clear_caches()
        fit.step_peak(cfg, strategy, n)  # what fit_on has done before it searches
        assert fit.model_state_floor(cfg, strategy, n) > budget
        asked: list[int] = []
        monkeypatch.setattr(fit, "_with_batch", asked.append)  # a batch built: recorded, and the search fails
        monkeypatch.setattr(affine_batch, "unrounded_programs", asked.append)
        assert fit.largest_batch(cfg, gpu, strategy, n) == 0
        assert asked == []
        monkeypatch.undo()


def test_alternatives_stacked_on_a_narrow_terminal_show_no_markup() -> None:
    """On a terminal too narrow for the alternatives table, each alternative is a block of 'column: value' lines,
    with the table's colours applied, not their markup printed."""
    result = runner.invoke(app, ["estimate", "--model", "llama-2-7b", "--gpu", "a100-80gb"], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    assert "--parallel zero3 -n 8\n  needs:" in result.output
    assert "fits: yes" in result.output and "[green]" not in result.output


def test_alternatives_keep_each_change_whole_on_an_80_column_terminal() -> None:
    """A change is copied as it stands: on 80 columns the table keeps every word of it whole."""
    result = runner.invoke(app, ["estimate", "--model", "llama-2-7b", "--gpu", "a100-80gb"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for change in ("training.activation_checkpointing=full", "training.master_weights=true",
                   "training.grad_accum_steps=2", "--parallel zero3 -n 8"):
        assert change in result.output, change
