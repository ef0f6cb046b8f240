"""The trace keeps ``torch._dynamo`` unimported (``estimator/measure/dynamo_free.py``), and its records are the
ones of the trace that imports it (``ESTIMATOR_TRACE_DYNAMO=1``, the behaviour before).

A fresh interpreter is needed to see what is imported: this test process has usually imported Dynamo already
(then the block does nothing). The subprocess traces a small MLP (no Dynamo at all) and a model checkpointing
its blocks (``checkpointed_module.py``), whose backward asks for ``torch._dynamo.disable``: the real package is
then imported mid-trace, in a thread of its own (imported on the trace's thread, it kept three frees out of the
step, 1,536 B more at the peak: a reference cycle made by the import holds the thread's frames while the trace
pauses the collector).
Afterwards ``torch.compile`` and ``torch._dynamo.disable`` work in the same process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from estimator.events import Event  # noqa: E402
from estimator.families.module import ModuleConfig, ModuleTrace  # noqa: E402
from estimator.measure.dynamo_free import DISABLE_ENV  # noqa: E402
from estimator.measure.module_trace import run_trace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MLP = {"module": "estimator.measure.examples:make_mlp", "kwargs": {"in_dim": 20, "hidden": 30, "out_dim": 12},
       "inputs": [{"shape": [4, 20]}]}
CHECKPOINTED = {"module": "tests.checkpointed_module:Checkpointed", "inputs": [{"shape": [4, 16]}]}
CASES = {"mlp fp32": (MLP, "fp32"), "mlp amp-bf16": (MLP, "amp-bf16"), "checkpointed": (CHECKPOINTED, "fp32")}

SCRIPT = textwrap.dedent("""\
    import builtins, dataclasses, gc, json, sys
    import torch
    from estimator.families.module import ModuleConfig
    from estimator.measure.module_trace import run_trace
    from tests.test_trace_dynamo_free import canonical

    def identity_caches():
        consts = torch._compile._disable_dynamo.__code__.co_consts
        code = next(c for c in consts if getattr(c, "co_name", "") == "inner")
        inners = [f for f in gc.get_referrers(code) if getattr(f, "__code__", None) is code]
        return len(inners), sum(f.__wrapped__.__dict__.get("__dynamo_disable") is f.__wrapped__ for f in inners)

    original_import = builtins.__import__
    out = {"traces": {}, "dynamo": {}}
    for key, (model, precision) in json.loads(sys.argv[1]).items():
        trace = run_trace(ModuleConfig.model_validate(model), precision)
        out["traces"][key] = canonical(trace)
        out["dynamo"][key] = "torch._dynamo" in sys.modules
        if key == "mlp fp32":
            out["after mlp"] = {"import restored": builtins.__import__ is original_import,
                                "stand-in gone": "_dynamo" not in torch.__dict__,
                                "identity caches": identity_caches()[1]}
    import torch._dynamo
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")
    out["after"] = {"config shared": torch._dynamo.config is sys.modules["torch._dynamo.config"],
                    "compiled": compiled(torch.ones(2)).tolist(),
                    "disabled": torch._dynamo.disable(lambda x: x + 1)(torch.ones(2)).tolist(),
                    "wrappers": identity_caches()[0] > 0, "identity caches": identity_caches()[1]}
    print(json.dumps(out))
    """)


def canonical(trace: ModuleTrace) -> str:
    """The trace as text, its wall time left out and each run of consecutive frees sorted by name: autocast
    frees its cached casts when it exits in an order that varies between processes (with or without this
    block), which no peak depends on."""
    def runs(events: tuple[Event, ...]) -> tuple[Event, ...]:
        out: list[Event] = []
        frees: list[Event] = []
        for e in (*events, None):
            if e is not None and e.nbytes < 0:
                frees.append(e)
                continue
            out += sorted(frees, key=lambda f: f.name)
            frees = []
            if e is not None:
                out.append(e)
        return tuple(out)

    return repr(dataclasses.replace(trace, seconds=0.0, step_events=runs(trace.step_events),
                                    end_events=runs(trace.end_events)))


def _trace_text(model: dict, precision: str) -> str:
    return canonical(run_trace(ModuleConfig.model_validate(model), precision))


def test_trace_without_dynamo_equals_the_trace_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], check=True, capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    out = json.loads(run.stdout)
    assert out["dynamo"] == {"mlp fp32": False, "mlp amp-bf16": False, "checkpointed": True}
    assert out["after mlp"] == {"import restored": True, "stand-in gone": True, "identity caches": 0}
    assert out["after"] == {"config shared": True, "compiled": [3.0, 3.0], "disabled": [2.0, 2.0], "wrappers": True,
                            "identity caches": 0}

    monkeypatch.setenv(DISABLE_ENV, "1")  # torch imports Dynamo as it does without us
    for key, (model, precision) in CASES.items():
        assert out["traces"][key] == _trace_text(model, precision), key


@pytest.mark.parametrize(("name", "globals_", "fromlist", "level", "asks"), [
    ("torch._dynamo", None, (), 0, True),
    ("torch._dynamo.source", None, ("ConstantSource",), 0, True),
    ("torch", None, ("_dynamo",), 0, True),
    ("torch", None, ("nn",), 0, False),
    ("torch._dynamo.config", None, (), 0, False),  # sys.modules has it while the block runs
    ("torch._dynamo_extra", None, (), 0, False),
    ("_dynamo.source", {"__package__": "torch._subclasses"}, ("AttrSource",), 2, True),  # from .._dynamo.source
    ("", {"__package__": "torch._subclasses"}, ("_dynamo",), 2, True),  # from .. import _dynamo
    ("fake_impls", {"__package__": "torch._subclasses"}, ("x",), 1, False),
])
def test_which_imports_need_the_real_package(name: str, globals_: dict | None, fromlist: tuple, level: int,
                                             asks: bool) -> None:
    from estimator.measure.dynamo_free import _asks_for_dynamo

    assert _asks_for_dynamo(name, globals_, fromlist, level, config_loaded=True) is asks


def test_the_installed_torch_has_the_shapes_the_block_answers() -> None:
    """On the torch the package is tested with, both parts apply (else the block would silently do nothing)."""
    from estimator.measure.dynamo_free import _inner_matches

    assert _inner_matches(torch._compile._disable_dynamo)
    assert (Path(torch.__file__).parent / "_dynamo" / "config.py").is_file()
