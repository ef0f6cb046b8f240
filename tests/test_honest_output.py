"""Every message true (issue 12, items 9-12, 14, 17, 19, 20): the values in force, one activation
figure, explanations that add up, the optimizers' real bytes, whole numbers at any width, the
defaults of a preset, and documented JSON keys. Expected values are derived by hand below."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from estimator import cli, estimate, load_config
from estimator.cli import app
from estimator.families.transformer import activation_elements_of, flop_parameters, parameter_count
from estimator.presets import get_preset
from estimator.report import explain, explain_terms, optimizer_state_summary, render_ranks

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def run(args: list[str], width: int = 100, monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    if monkeypatch is not None:
        monkeypatch.setattr(cli, "out", Console(width=width, highlight=False))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def flat(text: str) -> str:
    """The text with every run of whitespace (line wraps, table padding) as one space."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------------- item 9
def test_header_and_json_show_the_resolved_seq_len(monkeypatch: pytest.MonkeyPatch) -> None:
    # llama-2-7b's max_seq_len is 4096: with no training.seq_len the step uses S = 4096 tokens
    text = flat(run(["estimate", "--model", "llama-2-7b", "-b", "1"], 200, monkeypatch))
    assert "B=1, seq_len=4096 (the model's max_seq_len)" in text
    assert "T = B·S = 1·4,096 = 4,096 tokens" in text
    data = json.loads(run(["estimate", "--model", "llama-2-7b", "-b", "1", "--json"]))
    assert data["config"]["training"]["seq_len"] == 4096
    assert data["flops"]["rule_tokens"] == 4096


def test_module_batch_comes_from_its_input_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    cfg = ["--set", "model.module=estimator.measure.examples:make_mlp", "--set", "model.inputs=[{shape: [8, 16]}]",
           "--set", "model.kwargs={in_dim: 16, hidden: 32, out_dim: 4}", "-d", "cpu"]
    text = flat(run(["estimate", *cfg], 200, monkeypatch))
    assert "B=8 (inputs [8, 16] float32)" in text
    assert "B·P uses B = 8 samples (model.inputs[0].shape[0])" in text
    data = json.loads(run(["estimate", *cfg, "--json"]))
    assert data["config"]["training"]["batch_size"] == 8  # not the unused default 2
    # P: (16·32 + 32) + (32·32 + 32) + (32·4 + 4) = 1,732 parameters, all read by matmuls; B = 8 samples
    assert data["flops"]["rule_tokens"] == 8 and data["flops"]["rule_parameters"] == 1732
    assert data["flops"]["per_step"] == 6 * 8 * 1732


# ----------------------------------------------------------------------------------- item 10
def test_flops_footnote_names_the_n_the_rule_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = get_preset("llama-2-7b").config()
    n = flop_parameters(cfg)
    # Llama-2-7B: 6,738,415,616 parameters, less the 32000 x 4096 token embedding (a lookup)
    assert n == 6_738_415_616 - 32_000 * 4_096 == 6_607_343_616
    text = flat(run(["estimate", "--model", "llama-2-7b", "-b", "1", "--set", "training.seq_len=2048"], 200,
                    monkeypatch))
    assert "N = 6,607,343,616: the 6,738,415,616 parameters less 131,072,000" in text
    assert "P = 6,738,415,616" not in text
    est = estimate(load_config(overrides=["model.preset=llama-2-7b", "training.seq_len=2048", "training.batch_size=1"]))
    assert est.flops.rule_parameters == n and est.flops.tokens == 2048
    attention = 32 * 32 * 128 * 2048 * 2048  # L·H·h·S·T
    assert est.flops.per_step == 6 * n * 2048 + 12 * attention
    # the seed: P = 36, B = 2
    assert "B·P uses B = 2 samples (training.batch_size) and P = 36, every parameter" in flat(run(
        ["estimate"], 200, monkeypatch))


def test_gpt2_footnote_leaves_out_only_the_position_table() -> None:
    cfg = get_preset("gpt2").config()
    # tied head: the token embedding is the head's matmul; only the 1024 x 768 position table is a pure lookup
    assert parameter_count(cfg) - flop_parameters(cfg) == 1024 * 768


# ----------------------------------------------------------------------------------- item 11
CASES = {
    "seed": [],
    "seed-adam": ["optimizer.name=adam"],
    "seed-amp": ["optimizer.name=adamw", "training.precision=amp-bf16"],
    "seed-fused": ["optimizer.name=adam", "optimizer.implementation=fused"],
    "wide-sgd": ["model.dim=300", "training.batch_size=5", "optimizer.name=sgd"],
    "gpt2-small": ["model.preset=gpt2", "model.num_layers=2", "training.seq_len=64"],
    "llama-ckpt": ["model.preset=llama-2-7b", "model.num_layers=20", "model.d_model=256", "model.num_heads=4",
                   "model.d_ff=688", "model.vocab_size=1000", "training.seq_len=100",
                   "training.activation_checkpointing=full", "optimizer.name=adam"],
}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
def test_explanation_adds_up_to_the_peak(case: str, device: str) -> None:
    est = estimate(load_config(overrides=CASES[case]), device)
    terms = explain_terms(est)
    assert est.memory.total + sum(n for n, _ in terms) == est.peak_bytes
    rounding = est.block_rounding_at_peak()
    assert rounding is not None
    if device == "cpu":
        assert rounding == {}
    else:  # each live tensor is rounded up to 512 bytes: the rounding never exceeds 511 B a tensor
        assert all(n >= 0 for n in rounding.values())
        assert (est.peak_bytes - sum(rounding.values())) % 1 == 0
    text = "\n".join(explain(est))
    # 'step' scalars are named only where torch keeps them on the device (CPU, or the fused kernel)
    assert ("'step' scalars" in text) == (est.step_tensors_on_device and est.memory.optimizer_step_tensors > 0)
    if est.config.model.family != "mlp":
        assert "B·D·layers" not in text


def test_cuda_rounding_is_attributed_as_rounding() -> None:
    # the seed under Adam on CUDA: every tensor is under 512 bytes, so each becomes one 512-byte block.
    est = estimate(load_config(overrides=["optimizer.name=adam"]), "cuda")
    rounding = est.block_rounding_at_peak()
    assert rounding is not None
    # parameters: 3 tensors (64 + 64 + 16 B exact) -> 3 blocks = 1536 B, so +1392 B of rounding
    assert rounding["parameter"] == 3 * 512 - 4 * 36
    # inputs: x (32 B) and y (8 B) -> 2 blocks, +984 B
    assert rounding["input"] == 2 * 512 - 40
    text = "\n".join(explain(est))
    assert "CUDA's allocator rounds every tensor up to a multiple of 512 bytes" in text
    assert "parameters +1.36 KiB" in text and "inputs + targets +984 B" in text
    assert "'step' scalars" not in text  # on CUDA (foreach) torch keeps them on the CPU


def test_rounding_of_a_huge_periodic_step_is_read_off_its_programs() -> None:
    """~1M events kept as periodic programs: the rounding at the peak comes from the programs (not flattened),
    per role, and the panel's terms still add up to the peak."""
    est = estimate(load_config(overrides=["model.num_layers=100000"]), "cuda")
    rounding = est.block_rounding_at_peak()
    assert rounding and all(n > 0 for n in rounding.values())
    assert est.memory.total + sum(n for n, _ in explain_terms(est)) == est.peak_bytes


def test_verify_note_speaks_of_the_family_not_of_bdl() -> None:
    from estimator.report import leaves_out

    seed = estimate(load_config(), "cpu")
    gpt2 = estimate(load_config(overrides=CASES["gpt2-small"]), "cpu")
    assert "B·D·layers" in leaves_out(seed)
    assert "B·D·layers" not in leaves_out(gpt2) and "q/k/v" in leaves_out(gpt2)


# ----------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp-bf16", "amp-fp16"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_one_activation_figure_for_transformers(precision: str, device: str) -> None:
    est = estimate(load_config(overrides=[*CASES["gpt2-small"], f"training.precision={precision}"]), device)
    assert est.memory.activations == est.saved_activation_bytes == est.to_json()["saved_activations"]
    m = est.memory
    assert m.total == m.parameters + m.activations + m.gradients + m.optimizer_state


def test_llama_activations_weigh_the_fp32_tensors() -> None:
    # Llama-2-7B, amp-bf16, B=1, S=2048: the 12.05 GiB counted 2 bytes for every saved element
    est = estimate(load_config(overrides=["model.preset=llama-2-7b", "training.seq_len=2048",
                                          "training.batch_size=1", "training.precision=amp-bf16"]))
    elements = activation_elements_of(est.config.model, est.config.training)
    assert est.memory.activations == est.saved_activation_bytes
    assert est.memory.activations > 2 * elements  # fp32 stream, RMSNorm statistics, fp32 log-probs
    assert round(2 * elements / 2**30, 2) == 12.05 and round(est.memory.activations / 2**30, 2) == 14.21


def test_seed_first_order_table_unchanged() -> None:
    est = estimate(load_config(), "cpu")
    assert (est.memory.activations, est.memory.total, est.saved_activation_bytes) == (64, 496, 72)


# ----------------------------------------------------------------------------------- item 14
def test_optimizer_summaries_derive_bytes_from_the_registry() -> None:
    # adam8bit on a 4096 x 4096 matrix: two 8-bit codes per value (2 B) + two fp32 scales per 256 values
    n = 4096 * 4096
    per_param = (2 * n + 2 * (n // 256) * 4) / n
    assert per_param == 2.03125
    text = optimizer_state_summary("adam8bit")
    assert "2.03 B/param" in text and "per 256 values" in text and "8 B/param for tensors too small" in text
    ada = optimizer_state_summary("adafactor")
    assert "rows + cols values per matrix" in ada and "8,192 for 4096×4096" in ada
    assert "2× params" in optimizer_state_summary("adam") and "8 B/param in fp32" in optimizer_state_summary("adam")
    assert "0×" not in text and "0.000488281" not in ada


def test_readme_states_the_measured_adafactor_gap() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "within 0.02%" not in readme
    assert "568" in readme and "604" in readme


# ----------------------------------------------------------------------------------- item 17
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")

COMMANDS = {
    "estimate-seed": ["estimate", "--timeline", "-o", "adam"],
    "estimate-llama": ["estimate", "--model", "llama-2-7b", "-b", "1"],
    "estimate-gpu": ["estimate", "--model", "gpt2", "--gpu", "a100-80gb"],
    "estimate-ranks": ["estimate", "--model", "gpt2-xl", "--set", "model.num_layers=4", "--parallel", "zero2",
                       "-n", "8"],
    "compare": ["compare", "--model", "gpt2-xl", "--set", "model.num_layers=4"],
    "models": ["models"],
    "gpus": ["gpus"],
    "optimizers": ["optimizers"],
}


def numbers(text: str) -> set[str]:
    return set(NUMBER.findall(text))


@pytest.mark.parametrize("width", [60, 80])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_number_is_truncated(name: str, width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    wide = run(COMMANDS[name], 250, monkeypatch)
    narrow = run(COMMANDS[name], width, monkeypatch)
    assert "…" not in narrow
    assert all(cell_len(line) <= width for line in narrow.splitlines())
    missing = {n for n in numbers(wide) if not re.search(rf"(?<![\d,.]){re.escape(n)}(?![\d]|[,.]\d)", narrow)}
    assert not missing, f"numbers cut at {width} columns: {sorted(missing)[:10]}"


def _fake_measurement(est: Any) -> Any:
    step = SimpleNamespace(peak_bytes=est.peak_bytes + 123_456_789, peak_phase="optimizer_step")
    first = SimpleNamespace(peak_bytes=est.first_step_peak_bytes + 987_654_321)
    return SimpleNamespace(parameters=est.parameters, gradients=est.gradients, optimizer_state=est.optimizer_state,
                           steady_step=step, first_step=first)


@pytest.mark.parametrize("width", [60, 80])
def test_per_rank_verify_table_keeps_numbers_whole(width: int) -> None:
    from estimator.distributed import per_rank_estimates

    cfg = load_config(overrides=["model.preset=gpt2-xl", "model.num_layers=4"])
    ranks = per_rank_estimates(cfg, "ddp", 8, "cpu")
    measured = [_fake_measurement(r) for r in ranks]
    wide, narrow = Console(width=300, record=True), Console(width=width, record=True)
    render_ranks(ranks, measured, wide, 0.05)
    render_ranks(ranks, measured, narrow, 0.05)
    wide_text, narrow_text = wide.export_text(), narrow.export_text()
    assert "…" not in narrow_text
    for est, m in zip(ranks, measured, strict=True):
        for value in (est.peak_bytes, m.steady_step.peak_bytes, m.first_step.peak_bytes, est.parameters):
            assert f"{value:,}" in narrow_text and f"{value:,}" in wide_text


def test_verify_tables_keep_numbers_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    wide = run(["verify", "--device", "cpu", "-o", "adam", "--set", "model.dim=300"], 250, monkeypatch)
    narrow = run(["verify", "--device", "cpu", "-o", "adam", "--set", "model.dim=300"], 60, monkeypatch)
    assert "…" not in narrow
    missing = {n for n in numbers(wide) if not re.search(rf"(?<![\d,.]){re.escape(n)}(?![\d]|[,.]\d)", narrow)}
    assert not missing, sorted(missing)[:10]


# ----------------------------------------------------------------------------------- item 19
def test_presets_default_to_adamw_amp_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(overrides=["model.preset=gpt2"])
    assert (cfg.optimizer.name, cfg.training.precision) == ("adamw", "amp-bf16")
    assert "defaults for a preset: adamw, amp-bf16; override with -o/-p" in flat(
        run(["estimate", "--model", "gpt2"], 200, monkeypatch))
    hf = load_config(overrides=[f"model.hf_config={ROOT / 'configs' / 'hf' / 'gpt2.json'}"])
    assert (hf.optimizer.name, hf.training.precision) == ("adamw", "amp-bf16")


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.preset=gpt2", "optimizer.name=sgd"], ("sgd", "amp-bf16")),
    (["model.preset=gpt2", "training.precision=fp32"], ("adamw", "fp32")),
    ([], ("adagrad", "fp32")),  # the seed's example keeps the seed's defaults
    (["model.family=transformer"], ("adagrad", "fp32")),  # not a preset
])
def test_explicit_choices_win(overrides: list[str], expected: tuple[str, str]) -> None:
    cfg = load_config(overrides=overrides)
    assert (cfg.optimizer.name, cfg.training.precision) == expected


def test_config_file_optimizer_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(ROOT / "configs" / "llama-2-7b.yaml")  # names adamw and bf16 itself
    assert (cfg.optimizer.name, cfg.training.precision, cfg.training_defaults) == ("adamw", "bf16", ())
    data = json.loads(run(["estimate", "--model", "gpt2", "-o", "adam", "-p", "fp32", "--json"]))
    assert (data["optimizer"], data["precision"]) == ("adam", "fp32")
    assert "defaults for a preset" not in run(["estimate", "--model", "gpt2", "-o", "adam", "-p", "fp32"], 200,
                                              monkeypatch)


# ----------------------------------------------------------------------------------- item 20
def test_every_estimate_json_key_is_documented() -> None:
    data = json.loads(run(["estimate", "--model", "gpt2", "--set", "training.seq_len=64", "--gpu", "l4",
                           "--parallel", "zero1", "-n", "2", "--json"]))
    doc = (ROOT / "docs" / "json.md").read_text()
    keys = set(data) | {f"{section}.{key}" for section in ("memory", "flops") for key in data[section]}
    nested = set(data["gpu"]) | set(data["distributed"]) | set(data["distributed"]["ranks"][0]["memory"])
    missing = sorted(k for k in keys | nested if f"`{k}`" not in doc)
    assert not missing, f"undocumented JSON keys in docs/json.md: {missing}"


def test_module_factory_resolves_next_to_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_factory_next_to_config.py").write_text(
        "import torch\n\ndef build(dim: int = 4):\n    return torch.nn.Linear(dim, 1, bias=False)\n")
    (folder / "model.yaml").write_text(
        "model:\n  module: my_factory_next_to_config:build\n  inputs: [{shape: [2, 4]}]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # like hf_config: relative to the config file, not to the current directory
    data = json.loads(run(["estimate", str(folder / "model.yaml"), "-d", "cpu", "--json"]))
    assert data["parameters"] == 4
