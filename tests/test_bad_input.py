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


# --------------------------------------------------------------------------- issue 12: bounded, strict input
BILLION_LAUGHS = """model:
  module: estimator.measure.examples:make_mlp
  inputs: [{shape: [2, 4]}]
  kwargs:
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_item1_billion_laughs_fails_fast(tmp_path: Path) -> None:
    """9 levels of 9 aliases expand to 9^9 strings; refused at 1,000,000 values, in well under a second."""
    import time

    start = time.perf_counter()
    err = fails(["estimate", write(tmp_path, BILLION_LAUGHS)], "once its YAML aliases are expanded")
    assert time.perf_counter() - start < 5
    assert err.count("\n") == 1 and err.startswith("error: model.kwargs.")


def test_item1_aliases_bounded_in_set_and_cycles(tmp_path: Path) -> None:
    many = "[" + ", ".join(["*a"] * 101) + "]"
    fails(["estimate", "--set", f"model.kwargs={{a: &a 1, b: {many}}}"], "more than 100 YAML aliases")
    fails(["estimate", write(tmp_path, "model: &m\n  x: *m\n")], "refers to itself")
    ok = runner.invoke(app, ["estimate", "--json", write(tmp_path, "model: &m {dim: 8}\n", "ok.yaml")])
    assert ok.exit_code == 0, ok.output  # an anchor with few aliases is fine


@pytest.mark.parametrize(("options", "expected"), [
    (["-o", "adam", "--set", "optimizer.betas=[1.5,-3]"], "optimizer.betas: expected 0 <= β1 < 1 (torch.optim.Adam"),
    (["-o", "adamw", "--set", "optimizer.betas=[0.9,1.0]"], "optimizer.betas: expected 0 <= β2 < 1"),
    (["-o", "sgd", "--set", "optimizer.nesterov=true"], "optimizer.nesterov: nesterov requires momentum > 0"),
    (["-o", "adam", "--set", "optimizer.lr=-0.1"], "optimizer.lr: expected lr >= 0 (torch.optim.Adam"),
    (["-o", "rmsprop", "--set", "optimizer.alpha=-1"], "optimizer.alpha: expected alpha >= 0"),
    (["-o", "adagrad", "--set", "optimizer.eps=-1e-8"], "optimizer.eps: expected eps >= 0"),
    (["-o", "sgd", "--set", "optimizer.weight_decay=-1"], "optimizer.weight_decay: expected weight_decay >= 0"),
    (["-o", "sgd", "--set", "optimizer.momentum=-0.5"], "optimizer.momentum: expected momentum >= 0"),
    (["-o", "adam", "--set", "optimizer.lr=.inf"], "optimizer.lr: expected a finite number, got inf"),
    (["-o", "adam", "--set", "optimizer.betas=[.nan, .inf]"], "optimizer.betas.0: expected a finite number, got nan"),
    (["-o", "sgd", "--set", "optimizer.betas=[0.9,0.99]"], "optimizer.betas: sgd takes no betas"),
    (["-o", "momentum", "--set", "optimizer.momentum=0"], "the momentum optimizer needs momentum > 0"),
])
def test_item3_optimizer_options_torch_refuses(options: list[str], expected: str) -> None:
    fails(["estimate", *options], expected)
    fails(["verify", *options], expected)


TORCH_CASES = [  # (optimizer, options): torch's constructor and our config must agree on each
    ("adam", {"betas": (1.5, 0.9)}), ("adam", {"betas": (0.0, 0.0)}), ("adam", {"lr": 0.0}),
    ("adam", {"eps": -1e-8}), ("adamw", {"weight_decay": -0.1}), ("sgd", {"lr": -1.0}),
    ("sgd", {"momentum": 0.0, "nesterov": True}), ("sgd", {"momentum": 0.5, "nesterov": True}),
    ("sgd", {"momentum": 1.5}), ("rmsprop", {"alpha": 0.0}), ("rmsprop", {"alpha": 2.0}),
    ("rmsprop", {"momentum": -1.0}), ("adagrad", {"eps": 0.0}), ("adagrad", {"lr": -0.5}),
    ("adafactor", {"lr": -1.0}), ("adafactor", {"lr": 0.0}),
]


@pytest.mark.parametrize(("name", "options"), TORCH_CASES)
def test_item3_config_agrees_with_torch(name: str, options: dict) -> None:
    """Whatever torch.optim's constructor refuses, the config refuses, and the reverse."""
    torch = pytest.importorskip("torch")
    from estimator import EstimatorError, load_config
    from estimator.measure.models import torch_optimizer_class, torch_optimizer_kwargs

    overrides = [f"optimizer.name={name}"] + [
        f"optimizer.{k}={list(v) if isinstance(v, tuple) else str(v).lower()}" for k, v in options.items()]
    try:
        config = load_config(overrides=overrides)
    except EstimatorError:
        config = None
    param = torch.nn.Parameter(torch.zeros(2, 2))
    cls = torch_optimizer_class(name)
    kwargs = {**torch_optimizer_kwargs(load_config(overrides=[f"optimizer.name={name}"])), **options}
    try:
        cls([param], **kwargs)
        torch_ok = True
    except ValueError:
        torch_ok = False
    assert (config is not None) == torch_ok, (name, options, torch_ok)
    if config is not None:  # what the config passes, torch accepts
        cls([param], **torch_optimizer_kwargs(config))


def test_item9_options_that_cannot_apply(tmp_path: Path) -> None:
    fails(["estimate", "--set", "training.seq_len=16"], "training.seq_len: the mlp family has no sequence")
    module = write(tmp_path, "model:\n  module: estimator.measure.examples:make_mlp\n  inputs: [{shape: [2, 4]}]\n")
    fails(["estimate", module, "-b", "64"], "training.batch_size: not used by the module family")
    fails(["estimate", "-n", "4"], "--world-size: applies with --parallel only")
    fails(["verify", "-n", "4"], "--world-size: applies with --parallel only")
    fails(["estimate", "--mfu", "0.5"], "--mfu: applies with --gpu only")
    for extra, name in ((["--plot", "x.png"], "--plot"), (["--show-state"], "--show-state"),
                        (["--timeline"], "--timeline"), (["--impl", "textbook"], "--impl textbook")):
        fails(["verify", "--parallel", "ddp", *extra], f"{name}: not available with --parallel")


@pytest.mark.parametrize(("override", "path"), [
    ("model.dim=true", "model.dim"), ("training.batch_size=false", "training.batch_size"),
    ("optimizer.lr=true", "optimizer.lr"), ("model.num_layers=true", "model.num_layers"),
])
def test_item16_booleans_are_not_numbers(override: str, path: str) -> None:
    fails(["estimate", "--set", override], f"{path}: expected a number, not a boolean")


def test_item16_boolean_inside_a_shape() -> None:
    fails(["estimate", "--set", "model.module=estimator.measure.examples:make_mlp",
           "--set", "model.inputs=[{shape: [2, true]}]"], "model.inputs.0.shape: expected a number, not a boolean")


def test_item16_duplicate_keys(tmp_path: Path) -> None:
    fails(["estimate", write(tmp_path, "model:\n  dim: 4\n  dim: 8\n")],
          "duplicate key 'dim' at line 3 (first given at line 2)")
    fails(["estimate", write(tmp_path, '{"model": {"dim": 4, "dim": 8}}', "c.json")], "duplicate key 'dim'")


@pytest.mark.parametrize(("names", "expected"), [
    ("sgd,sgd", "'sgd' is given twice"), ("sgd,,adam", "name 2 is empty"), ("sgd,", "name 2 is empty"),
    ("", "give at least one optimizer name"), ("SGD,sgd", "'sgd' is given twice"),
])
def test_item16_compare_names(names: str, expected: str) -> None:
    fails(["compare", "--optimizers", names], expected)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_item16_empty_config_file(tmp_path: Path, text: str) -> None:
    fails(["estimate", write(tmp_path, text)], "the file is empty")


def test_item16_timeline_json_includes_the_timeline() -> None:
    import json

    result = runner.invoke(app, ["estimate", "--timeline", "--json", "-d", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    steady = data["timeline"]["steady_step"]
    assert max(p["live_bytes"] for p in steady) == data["peak_bytes"]
    assert {p["phase"] for p in steady} >= {"forward", "backward", "optimizer_step"}


def test_layers_and_config_size_bounded(tmp_path: Path) -> None:
    fails(["estimate", "--set", "model.num_layers=100001"],
          "model.num_layers: input should be less than or equal to 100000")
    fails(["estimate", "-m", "gpt2", "--set", "model.num_layers=100001"],
          "model.num_layers: at most 100,000 layers")
    big = tmp_path / "big.yaml"
    big.write_text("model:\n  dim: 4\n# " + "x" * (1 << 20) + "\n")
    fails(["estimate", str(big)], "larger than 1 MiB")
    fails(["estimate", write(tmp_path, "model:\n  dim: " + "9" * 5000 + "\n")], "invalid value")


def test_item16_timeline_json_is_bounded() -> None:
    """Over 10,000 events, each of 10,000 runs keeps its highest point: the peak stays exact."""
    from estimator.cli import _curve_json

    points = [("forward", i % 7) for i in range(23)] + [("backward", 100)] + [("zero_grad", 1)] * 6
    short = _curve_json(points, most=10)
    assert len(short) == 10 and max(p["live_bytes"] for p in short) == 100
    assert {"phase": "backward", "live_bytes": 100} in short
    assert _curve_json(points, most=30) == [{"phase": p, "live_bytes": v} for p, v in points]
