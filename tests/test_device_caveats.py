"""A CUDA estimate says which parts of the step it models as the CPU runs them (estimator/device_caveats.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from estimator.cli import app
from estimator.device_caveats import cpu_forms
from estimator.families.transformer import TransformerConfig

runner = CliRunner()


def test_only_cuda_estimates_with_those_parts_carry_a_caveat() -> None:
    plain = TransformerConfig(num_layers=1, d_model=8, num_heads=2, vocab_size=16, max_seq_len=8)
    assert cpu_forms(plain, "cuda") == ()
    dropped = plain.model_copy(update={"resid_dropout": 0.1})
    assert cpu_forms(dropped, "cpu") == ()
    (line,) = cpu_forms(dropped, "cuda")
    assert line.startswith("dropout (resid_dropout=0.1) is estimated as the CPU runs it") and "math" not in line
    (line,) = cpu_forms(dropped.model_copy(update={"attn_dropout": 0.1}), "cuda")
    assert "resid_dropout=0.1, attn_dropout=0.1" in line and "math attention" in line
    (line,) = cpu_forms(SimpleNamespace(deepseek_transformers=True), "cuda")
    assert line.startswith("DeepSeek-V3's attention (v heads narrower than q/k) is estimated as the CPU runs it")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_cli_prints_and_emits_them(device: str) -> None:
    args = ["estimate", "--set", "model.family=transformer", "--set", "model.resid_dropout=0.1", "--device", device]
    table = runner.invoke(app, args, env={"COLUMNS": "400"})
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert table.exit_code == 0, table.output
    if device == "cuda":
        assert "On CUDA: dropout (resid_dropout=0.1) is estimated as the CPU runs it" in table.output
        assert data["device_caveats"][0].startswith("dropout (resid_dropout=0.1)")
    else:
        assert "On CUDA" not in table.output and "device_caveats" not in data
