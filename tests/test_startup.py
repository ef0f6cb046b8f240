"""Start-up of the command (issue 8): what `import estimator.cli` and `estimate --json` leave unimported,
pydantic's plugin scan skipped for the package's own models, and the estimate's shortcuts exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from estimator.api import _saved_bytes
from estimator.loader import load_config
from estimator.simulate import simulate

HEAVY = ("torch", "rich", "transformers", "matplotlib", "numpy")


def _python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object on its last line."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_cli_imports_no_heavy_package() -> None:
    seen = _python("import sys, json, estimator.cli\n"
                   f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    assert seen == []


def test_estimate_json_never_imports_rich_or_torch() -> None:
    code = ("import io, json, sys\n"
            "from estimator.cli import main\n"
            "sys.argv = ['estimator', 'estimate', '--json']\n"
            "real, sys.stdout = sys.stdout, io.StringIO()\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
            "doc, sys.stdout = json.loads(sys.stdout.getvalue()), real\n"
            f"print(json.dumps({{'code': code, 'total': doc['memory']['total'],"
            f" 'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))")
    result = _python(code)
    assert result == {"code": 0, "total": 496, "heavy": []}  # the seed's 496 B, and nothing heavy imported


@pytest.mark.parametrize("setting", [None, "logfire"])
def test_pydantic_plugins_not_scanned_and_the_setting_restored(setting: str | None) -> None:
    pytest.importorskip("pydantic.plugin._loader")
    code = ("import json, os, estimator.cli\n"
            "import pydantic.plugin._loader as loader\n"
            "print(json.dumps({'scanned': loader._plugins is not None,"
            " 'setting': os.environ.get('PYDANTIC_DISABLE_PLUGINS')}))")
    env = dict(os.environ)
    env.pop("PYDANTIC_DISABLE_PLUGINS", None)
    if setting is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = setting
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"scanned": False, "setting": setting}


@pytest.mark.parametrize(("base", "sets"), [
    (None, []),                                                  # the seed's MLP: a flat step
    (None, ["model.num_layers=1000"]),                           # compressed (periodic programs)
    ({"model": {"preset": "gpt2"}}, ["training.seq_len=64"]),   # a flat transformer step
    ({"model": {"preset": "gpt2"}}, ["training.seq_len=64", "model.num_layers=40",
                                     "training.activation_checkpointing=full", "training.precision=amp-bf16"]),
])
def test_saved_bytes_without_a_second_simulation_equal_the_cpu_step(base: dict | None, sets: list[str]) -> None:
    """The CUDA estimate reads saved-for-backward bytes off its own unrounded programs (or the family's
    forward-backward events) instead of simulating the step again on the CPU: the same integer."""
    config = load_config(None, sets, base=base)
    step = simulate(config, "cuda")
    expected = simulate(config, "cpu").saved_activation_bytes
    assert _saved_bytes(config, step) == expected
    assert _saved_bytes(config) == expected


def test_input_bytes_of_a_compressed_step_equal_the_flat_setup() -> None:
    from estimator.api import estimate

    est = estimate(load_config(None, ["model.num_layers=1000"]), "cuda")
    assert type(est.step).__name__ == "CompressedStep"
    assert est.input_bytes == sum(e.nbytes for e in est.step.setup if e.role == "input") == 1024  # 2 blocks of 512
