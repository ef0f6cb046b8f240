"""Every kind of bad input: one readable line naming the field, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from estimator.cli import app

runner = CliRunner()


def fails(args: list[str], *expected: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)
    assert result.stdout == ""
    return result.stderr


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_missing_file() -> None:
    fails(["estimate", "nope.yaml"], "config file not found: nope.yaml")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    fails(["estimate", write(tmp_path, "model:\n  dim: [4\n")], "invalid YAML at line")


def test_json_syntax_error(tmp_path: Path) -> None:
    fails(["estimate", write(tmp_path, '{"model": {', "c.json")], "invalid JSON at line 1")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    fails(["estimate", write(tmp_path, "- 1\n- 2\n")], "the top level must be a mapping")


def test_unknown_optimizer_suggests_closest() -> None:
    fails(["estimate", "-o", "adm"], "optimizer.name: unknown optimizer 'adm'; did you mean 'adam'?", "known: sgd")


def test_unknown_family_suggests_closest(tmp_path: Path) -> None:
    fails(["estimate", write(tmp_path, "model:\n  family: mpl\n")], "model.family: unknown model family 'mpl'",
          "did you mean 'mlp'?")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_sizes(value: str) -> None:
    fails(["estimate", "--set", f"model.dim={value}"], "model.dim: input should be greater than 0")


def test_wrong_type() -> None:
    fails(["estimate", "--set", "training.batch_size=two"], "training.batch_size: input should be a valid integer")


def test_unknown_key_in_file(tmp_path: Path) -> None:
    fails(["estimate", write(tmp_path, "model:\n  dimm: 4\n")], "model.dimm: unknown key; did you mean 'dim'?")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    fails(["estimate", write(tmp_path, "trainig:\n  batch_size: 4\n")],
          "trainig: unknown key; did you mean 'training'?")


def test_set_path_that_does_not_exist() -> None:
    fails(["estimate", "--set", "optimizer.betaz=[0.9,0.99]"],
          "--set optimizer.betaz=[0.9,0.99]: optimizer has no field", "did you mean 'betas'?")


def test_set_without_equals() -> None:
    fails(["estimate", "--set", "training.batch_size"], "expected PATH=VALUE")


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    err = fails(["estimate", write(tmp_path, "model:\n  dim: 0\n  num_layers: -1\n")])
    assert "model.dim" in err and "model.num_layers" in err and len(err.strip().splitlines()) == 2


def test_option_for_the_wrong_optimizer() -> None:
    fails(["estimate", "-o", "sgd", "--set", "optimizer.amsgrad=true"], "optimizer.amsgrad: amsgrad applies to adam")


def test_bad_precision() -> None:
    fails(["estimate", "-p", "fp8"], "training.precision")


def test_compare_with_unknown_optimizer() -> None:
    fails(["compare", "--optimizers", "sgd,lamb"], "unknown optimizer 'lamb'")


def test_module_forward_failure_is_one_line() -> None:
    pytest.importorskip("torch")
    err = fails(["estimate", "--set", "model.module=estimator.measure.examples:make_lora_mlp",
                 "--set", "model.inputs=[{shape: [8, 16]}]"], "model.inputs:", "failed: RuntimeError")
    assert len(err.strip().splitlines()) == 1
