"""The fixed cost of every command (issue 8): what a plain ``estimate`` leaves unimported or uncomputed,
and the shortcuts it takes checked equal to the slow paths they skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from typer.testing import CliRunner

from estimator import cli, report
from estimator.api import _saved_bytes, estimate
from estimator.cli import app
from estimator.loader import load_config
from estimator.simulate import simulate
from estimator.startup import PLUGIN_LOADER, PLUGINS_SETTING, _PluginLoaderStandIn, plugin_loader_stand_in

runner = CliRunner()

# imported only by pydantic's plugin loader: importlib.metadata (and with it email, csv...); rich's emoji
# table, only by markup that may hold an emoji code (a panel title given as a string)
NOT_IMPORTED = ("importlib.metadata", "email", "csv", "rich._emoji_codes")


@pytest.mark.parametrize("args", [["estimate"], ["estimate", "--json"], ["estimate", "--model", "gpt2"]])
def test_a_plain_estimate_does_not_import(args: list[str]) -> None:
    code = ("import io, json, sys\n"
            "from estimator.cli import main\n"
            f"sys.argv = ['estimator', *{args!r}]\n"
            "real, sys.stdout = sys.stdout, io.StringIO()\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
            "sys.stdout = real\n"
            f"print(json.dumps({{'code': code, 'imported': sorted(m for m in {NOT_IMPORTED!r} if m in sys.modules),"
            f" 'loader': type(sys.modules.get({PLUGIN_LOADER!r})).__name__}}))")
    env = {k: v for k, v in os.environ.items() if k != PLUGINS_SETTING}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    # nothing imported, and the stand-in gone once the command is over (a later model loads the real loader)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "imported": [], "loader": "NoneType"}


def test_the_plugin_loader_stand_in_answers_as_the_real_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sys.modules.pop(PLUGIN_LOADER, None)
    try:
        stand_in = _PluginLoaderStandIn()
        for value in ("__all__", "1", "true"):
            monkeypatch.setenv(PLUGINS_SETTING, value)
            assert stand_in.get_plugins() == ()
        assert PLUGIN_LOADER not in sys.modules  # it answered without importing the real loader
        with plugin_loader_stand_in():
            assert sys.modules[PLUGIN_LOADER].get_plugins() == ()
            monkeypatch.delenv(PLUGINS_SETTING)
            found = sys.modules[PLUGIN_LOADER].get_plugins()  # a plugin may be wanted: the real loader's answer
            loader = sys.modules[PLUGIN_LOADER]
            assert not isinstance(loader, _PluginLoaderStandIn)
            assert list(found) == list(loader.get_plugins())
        assert sys.modules[PLUGIN_LOADER] is loader  # the real loader stays
        del sys.modules[PLUGIN_LOADER]
        with plugin_loader_stand_in():
            group = sys.modules[PLUGIN_LOADER].PYDANTIC_ENTRY_POINT_GROUP  # any other name: the real loader's
            assert group == "pydantic"
            assert not isinstance(sys.modules[PLUGIN_LOADER], _PluginLoaderStandIn)
        with plugin_loader_stand_in():  # the real loader loaded: no stand-in
            assert not isinstance(sys.modules[PLUGIN_LOADER], _PluginLoaderStandIn)
        assert not hasattr(_PluginLoaderStandIn(), "__path__")  # the import system asks: not a package
    finally:
        if real is not None:
            sys.modules[PLUGIN_LOADER] = real


@pytest.mark.parametrize(("base", "sets", "device"), [
    (None, [], "cuda"),
    ({"model": {"preset": "gpt2"}}, ["training.seq_len=64"], "cuda"),                 # a flat transformer step
    ({"model": {"preset": "gpt2"}}, ["training.seq_len=64", "model.num_layers=40"], "cuda"),  # compressed
    ({"model": {"preset": "gpt2"}}, ["training.seq_len=64", "training.precision=amp-bf16"], "cpu"),
])
def test_saved_activations_computed_when_asked_equal_the_cpu_step(base: dict | None, sets: list[str],
                                                                    device: str) -> None:
    config = load_config(None, sets, base=base)
    est = estimate(config, device)
    assert "saved_activations" not in est.__dict__  # not computed by estimate(): the tables do not print it
    expected = simulate(config, "cpu").saved_activation_bytes
    assert est.saved_activations == est.saved_activation_bytes == expected == _saved_bytes(config)
    assert est.to_json()["saved_activations"] == expected


def _tables(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> list[Table]:
    """Every table ``args`` prints through print_fitting."""
    seen: list[Table] = []
    fitting = report.print_fitting

    def keep(console: Console, table: Table) -> None:
        seen.append(table)
        fitting(console, table)

    monkeypatch.setattr(report, "print_fitting", keep)
    monkeypatch.setattr(cli, "out", Console(width=100, highlight=False))
    assert runner.invoke(app, args).exit_code == 0
    monkeypatch.setattr(report, "print_fitting", fitting)
    return seen


COMMANDS = [["estimate", "--timeline", "-o", "adam"], ["estimate", "--model", "gpt2", "--gpu", "a100-80gb"],
            ["compare", "--device", "cpu"], ["optimizers"]]


@pytest.mark.parametrize("args", COMMANDS)
def test_the_widest_bound_is_at_least_what_rich_measures(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    tables = _tables(monkeypatch, args)
    assert tables
    console = Console(width=100)
    for table in tables:
        measured = Measurement.get(console, console.options.update_width(1_000_000), table)
        assert measured.minimum <= measured.maximum <= report._widest(table)
    grid = Table.grid()
    grid.add_column(ratio=1)
    assert report._widest(grid) == float("inf")  # left to rich
    odd = Table()
    odd.add_column("a")
    odd.add_row(Text("x"))
    odd.add_row(grid)
    assert report._widest(odd) == float("inf")


@pytest.mark.parametrize("args", COMMANDS)
def test_print_fitting_prints_what_the_measurement_alone_prints(args: list[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for width in (30, 60, 80, 120):
        outputs = []
        for widest in (report._widest, lambda table: float("inf")):
            monkeypatch.setattr(report, "_widest", widest)
            monkeypatch.setattr(cli, "out", Console(width=width, highlight=False))
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
            outputs.append(result.stdout)
        assert outputs[0] == outputs[1]


@pytest.mark.parametrize("collector_on", [True, False])
def test_the_imports_leave_the_collector_as_it_was_and_the_command_freezes_them(collector_on: bool) -> None:
    code = ("import gc, io, json, sys\n"
            f"{'' if collector_on else 'gc.disable()'}\n"
            "import estimator.cli\n"
            "after_import = gc.isenabled()\n"
            "sys.argv = ['estimator', 'estimate', '--json']\n"
            "real, sys.stdout = sys.stdout, io.StringIO()\n"
            "try:\n    estimator.cli.main()\nexcept SystemExit as exc:\n    code = exc.code\n"
            "doc, sys.stdout = json.loads(sys.stdout.getvalue()), real\n"
            "print(json.dumps({'code': code, 'total': doc['memory']['total'], 'after_import': after_import,"
            " 'after_command': gc.isenabled(), 'frozen': gc.get_freeze_count() > 1000}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "code": 0, "total": 496, "after_import": collector_on, "after_command": collector_on, "frozen": True}
