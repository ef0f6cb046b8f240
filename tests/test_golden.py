"""What the CLI prints, byte for byte, against reviewed golden files (torchinfo's habit).

Regenerate on purpose with ``pytest tests/test_golden.py --update-golden`` and review the diff.
"""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from estimator import cli
from estimator.cli import app

runner = CliRunner()

CASES = {
    "estimate_seed_cpu": ["estimate", "--device", "cpu"],
    "estimate_seed_cuda_timeline": ["estimate", "--timeline", "-o", "adam"],
    "compare_seed": ["compare", "--device", "cpu"],
    "optimizers": ["optimizers"],
    "models": ["models"],
    "gpus": ["gpus"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_output_matches_golden(name: str, golden: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # a fixed width, whatever the terminal or COLUMNS of the machine running the tests
    monkeypatch.setattr(cli, "out", Console(width=100, highlight=False))
    result = runner.invoke(app, CASES[name])
    assert result.exit_code == 0, result.output
    golden(name, result.stdout)
