"""Property-based test of the whole CLI (issue 12, the bar): random and adversarial configs and options.

For every command: the exit code is 0 or 2 (never 1 from an unexpected exception, never a traceback);
on 2, stdout is empty and stderr says ``error: ...``; under ``--json`` stdout is exactly one strict
(RFC 8259) JSON document; each run finishes in bounded time. In-process (Typer's CliRunner),
derandomized and with small example counts, so the suite stays fast and deterministic.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from estimator.cli import app

runner = CliRunner()
SECONDS_PER_RUN = 60.0  # far above any run's time here (most take milliseconds): a hang, not a slow run
MEMORY_BOUND = 4 << 30  # peak RSS of this test process, torch included

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])

OPTIMIZERS = ["sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "lion", "adafactor", "adam8bit"]
PRECISIONS = ["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"]
PRESETS = ["gpt2", "llama-2-7b", "tinyllama-1.1b", "qwen2-0.5b", "pythia-160m"]
MODULES = ["estimator.measure.examples:make_mlp", "estimator.measure.examples:make_lora_mlp",
           "no.such.module:factory", "json:loads", "estimator.measure.examples:nothing_here"]
FIELDS = {
    "model": ["family", "dim", "num_layers", "preset", "module", "kwargs", "inputs", "loss", "vocab_size",
              "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff", "mlp", "norm", "bias", "positions",
              "max_seq_len", "tie_embeddings", "attention", "rope_theta", "rotary_pct", "dimm"],
    "training": ["batch_size", "seq_len", "precision", "activation_checkpointing", "batchsize"],
    "optimizer": ["name", "lr", "momentum", "nesterov", "alpha", "betas", "eps", "weight_decay", "amsgrad",
                  "centered", "implementation", "beta"],
}

# Numbers that are edges: zero, negatives, huge, beyond 64 bits, non-finite, booleans.
numbers = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 64, 1024, 1025, -1, -3, 10**12, 2**63, 2**64 + 1, 1.5, 0.9, 0.999,
                     1.0, -0.0, 1e-8, 1e308, float("nan"), float("inf"), float("-inf"), True, False, None]),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
words = st.one_of(st.sampled_from(OPTIMIZERS + PRECISIONS + PRESETS + MODULES + [
    "mlp", "transformer", "module", "cuda", "cpu", "full", "none", "swiglu", "rmsnorm", "rope", "fused", "foreach",
    "for-loop", "auto", "mse", "cross_entropy", "sum", "", " ", "ADAM", "x" * 300]), st.text(max_size=6))
leaves = st.one_of(numbers, words)
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(words, inner, max_size=3)), max_leaves=8)
inputs = st.lists(st.fixed_dictionaries({"shape": st.lists(st.sampled_from([1, 2, 4, 0, -1, True]), min_size=1,
                                                                     max_size=3)},
                                        optional={"dtype": st.sampled_from(["float32", "int64", "bool", "fp8"]),
                                                  "high": st.sampled_from([1, 16, 0, -5])}), max_size=2)


PLAUSIBLE: dict[str, list[Any]] = {
    "family": ["mlp", "transformer", "module"], "dim": [1, 2, 4, 16], "num_layers": [1, 2, 3, 12],
    "preset": PRESETS, "module": MODULES[:2], "kwargs": [{}, {"dim": 4}, {"in_features": 4}],
    "loss": ["mse", "cross_entropy", "sum"], "vocab_size": [16, 50257], "d_model": [8, 64, 768],
    "num_heads": [1, 2, 4, 12], "num_kv_heads": [1, 2, None], "head_dim": [None, 4, 64], "d_ff": [None, 32],
    "mlp": ["gelu", "swiglu"], "norm": ["layernorm", "rmsnorm"], "bias": [True, False],
    "positions": ["learned", "rope"], "max_seq_len": [8, 64, 1024], "tie_embeddings": [True, False],
    "attention": ["sdpa", "eager"], "rope_theta": [10000.0], "rotary_pct": [0.25, 1.0],
    "batch_size": [1, 2, 8], "seq_len": [None, 4, 64], "precision": PRECISIONS,
    "activation_checkpointing": ["none", "full"], "name": OPTIMIZERS, "lr": [0.0, 1e-3, 0.01],
    "momentum": [0.0, 0.9], "nesterov": [False, True], "alpha": [0.99], "betas": [[0.9, 0.999], [0.0, 0.5]],
    "eps": [1e-8, 0.0], "weight_decay": [0.0, 0.1], "amsgrad": [False, True], "centered": [False, True],
    "implementation": ["auto", "for-loop", "foreach", "fused"],
}


@st.composite
def field_value(draw: Any, field: str) -> Any:
    """Mostly a value the field takes (to reach deep code), sometimes an adversarial one."""
    if field == "inputs":
        return draw(inputs)
    if field in PLAUSIBLE and draw(st.integers(0, 3)):
        return draw(st.sampled_from(PLAUSIBLE[field]))
    return draw(values)


FAMILY_FIELDS = {
    "mlp": ["dim", "num_layers"],
    "transformer": ["vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "mlp", "norm",
                    "bias", "positions", "max_seq_len", "tie_embeddings", "attention"],
    "preset": ["num_layers", "max_seq_len", "attention"],
    "module": ["kwargs", "inputs", "loss"],
}


@st.composite
def coherent_model(draw: Any) -> dict[str, Any]:
    """A model section of one family with fields it takes (values still sometimes adversarial)."""
    family = draw(st.sampled_from(list(FAMILY_FIELDS)))
    model: dict[str, Any] = {}
    if family == "preset":
        model["preset"] = draw(st.sampled_from(PRESETS))
    elif family == "module":
        model["module"] = draw(st.sampled_from(MODULES[:2]))
        model["inputs"] = [{"shape": [draw(st.sampled_from([1, 2, 4])), 16]}]
    else:
        model["family"] = family
    for field in draw(st.lists(st.sampled_from(FAMILY_FIELDS[family]), max_size=3, unique=True)):
        model[field] = draw(field_value(field))
    return model


@st.composite
def sections(draw: Any) -> dict[str, Any]:
    """A config mapping: a coherent model (mostly) or arbitrary sections, with plausible or adversarial values."""
    data: dict[str, Any] = {}
    coherent = draw(st.integers(0, 3)) > 0
    for section, fields in FIELDS.items():
        if section == "model" and coherent:
            if draw(st.booleans()):
                data["model"] = draw(coherent_model())
        elif draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(fields[:-1] if coherent else fields), max_size=3, unique=True))
            body = {field: draw(field_value(field)) for field in chosen}
            data[section] = body if coherent or draw(st.integers(0, 9)) else draw(values)
    if draw(st.booleans()):
        data["device"] = draw(st.sampled_from(["cpu", "cuda"] if coherent else ["cpu", "cuda", "tpu", 1]))
    if not coherent and draw(st.integers(0, 9)) == 0:
        data["nonsense"] = draw(values)
    return data


ADVERSARIAL_TEXTS = [
    "",
    "# nothing\n",
    "- 1\n- 2\n",
    "model: {dim: 4, dim: 5}\n",
    "model: &m\n  kwargs: *m\n",
    "a: &a [*a]\n",
    "model:\n  kwargs:\n    a: &a [1,1,1,1,1,1,1,1,1]\n    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n",
    "model: !!python/object/apply:os.system ['echo pwned']\n",
    "[" * 3000 + "]" * 3000,
    "model:\n  dim: " + "9" * 5000 + "\n",
    "\x00\x01",
    "model: {dim: .nan}\n",
    "{",
    "model:\n\tdim: 4\n",
]


@st.composite
def config_files(draw: Any, tmp: Path) -> list[str]:
    """[] (the seed's example), or one file: generated YAML/JSON, or an adversarial text."""
    kind = draw(st.sampled_from(["none", "none", "yaml", "yaml", "json", "adversarial"]))
    if kind == "none":
        return []
    path = tmp / f"c{draw(st.integers(0, 10**6))}.{'json' if kind == 'json' else 'yaml'}"
    if kind == "adversarial":
        path.write_text(draw(st.sampled_from(ADVERSARIAL_TEXTS)))
    elif kind == "json":
        path.write_text(json.dumps(draw(sections()), default=str))
    else:
        path.write_text(yaml.safe_dump(draw(sections()), allow_unicode=True))
    return [str(path)]


def set_options() -> Any:
    known = [f"{s}.{f}" for s, fs in FIELDS.items() for f in fs]
    plausible = st.sampled_from([f"{s}.{f}" for s in ("training", "optimizer") for f in FIELDS[s][:-1]]).flatmap(
        lambda path: field_value(path.split(".")[1]).map(lambda v: (path, v)))
    adversarial = st.tuples(st.one_of(st.sampled_from(known + ["device", "model", "a..b", "=", "model.kwargs.x"]),
                                      st.text(max_size=8)), values)
    raw = st.one_of(plausible, plausible, plausible, adversarial).map(
        lambda pv: f"{pv[0]}={yaml.safe_dump(pv[1], default_flow_style=True).strip().removesuffix('...').strip()}")
    tricky = st.sampled_from(["model.kwargs=&a [*a]", "model.dim={a: 1, a: 2}", "model.dim=[", "optimizer.lr=.nan",
                              "model.dim=true", "training.seq_len=", "model=", "optimizer.betas=[.inf, 0]"])
    return st.one_of(raw, raw, raw, tricky).map(lambda text: ["--set", text])


def options(command: str, tmp: Path) -> Any:
    """Chunks of options: mostly valid ones, some invalid, at most 4."""
    good = [
        set_options(),
        st.tuples(st.just("-b"), st.sampled_from(["1", "2", "8", "64"])),
        st.tuples(st.just("-p"), st.sampled_from(PRECISIONS)),
        st.tuples(st.just("-m"), st.sampled_from(PRESETS)),
        st.tuples(st.just("-d"), st.sampled_from(["cpu", "cuda"])),
        st.just(("--json",)), st.just(("--json",)),
    ]
    bad = [
        st.tuples(st.just("-b"), st.sampled_from(["0", "-4", "1e3", "x", "99999999999999999999"])),
        st.tuples(st.just("-p"), st.sampled_from(["fp8", ""])),
        st.tuples(st.just("-m"), st.sampled_from(["gpt-5", ""])),
        st.tuples(st.just("-d"), st.just("tpu")),
        st.just(("--no-such-option",)),
    ]
    if command == "estimate":
        good += [
            st.tuples(st.just("-o"), st.sampled_from(OPTIMIZERS)),
            st.just(("--timeline",)),
            st.tuples(st.just("--gpu"), st.sampled_from(["h100-sxm", "a100-40gb", "t4"])),
            st.tuples(st.just("--mfu"), st.sampled_from(["0.4", "1"])),
            st.tuples(st.just("--parallel"), st.sampled_from(["ddp", "zero1", "zero2", "zero3"])),
            st.tuples(st.just("-n"), st.sampled_from(["1", "2", "3", "8", "64"])),
            st.tuples(st.just("--plot"), st.just(str(tmp / "p.png"))),
        ]
        bad += [
            st.tuples(st.just("-o"), st.sampled_from(["adm", ""])),
            st.tuples(st.just("--gpu"), st.just("h200x")),
            st.tuples(st.just("--mfu"), st.sampled_from(["0", "1.5", "nan", "inf", "-1"])),
            st.tuples(st.just("--parallel"), st.just("tp")),
            st.tuples(st.just("-n"), st.sampled_from(["-1", "0", "1048577", "x"])),
            st.tuples(st.just("--plot"), st.sampled_from(["/proc/x.png", str(tmp / "p.txt")])),
        ]
    else:  # compare
        good.append(st.tuples(st.just("--optimizers"), st.lists(st.sampled_from(OPTIMIZERS), min_size=1,
                                                                max_size=4, unique=True).map(",".join)))
        bad.append(st.tuples(st.just("--optimizers"), st.lists(st.sampled_from([*OPTIMIZERS, "", "adm", "SGD"]),
                                                               min_size=1, max_size=4).map(",".join)))
    chunk = st.one_of(*[st.one_of(*good)] * 5, st.one_of(*bad))
    return st.lists(chunk, max_size=3).map(lambda chunks: [a for c in chunks for a in c])


def check(args: list[str], json_always: bool = False) -> None:
    """The property every run must have."""
    start = time.monotonic()
    result = runner.invoke(app, args)
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS_PER_RUN, (args, elapsed)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert result.exit_code in (0, 2), (args, result.exit_code, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    if result.exit_code == 2:
        assert result.stdout == "", (args, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), (args, result.stderr)
    elif json_always or "--json" in args:
        def refuse(name: str) -> Any:
            raise AssertionError(f"{name} is not JSON")

        json.loads(result.stdout, parse_constant=refuse)  # exactly one document (trailing text fails)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < MEMORY_BOUND


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("property")


@SETTINGS
@given(data=st.data())
def test_estimate_never_crashes(tmp: Path, data: Any) -> None:
    check(["estimate", *data.draw(config_files(tmp)), *data.draw(options("estimate", tmp))])


@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_compare_never_crashes(tmp: Path, data: Any) -> None:
    check(["compare", *data.draw(config_files(tmp)), *data.draw(options("compare", tmp))])


@pytest.mark.parametrize("command", ["optimizers", "models", "gpus", "schema"])
@pytest.mark.parametrize("extra", [[], ["--json"], ["--nope"], ["x"]])
def test_listing_commands(command: str, extra: list[str]) -> None:
    if command == "schema" and extra == ["--json"]:
        extra = []
    check([command, *extra], json_always=command == "schema")


@settings(SETTINGS, max_examples=8)
@given(dim=st.sampled_from([1, 2, 4, 0, -1]), layers=st.sampled_from([1, 2, 3, 0]),
       batch=st.sampled_from(["1", "2", "4", "0", "true"]), optimizer=st.sampled_from([*OPTIMIZERS, "adm"]),
       precision=st.sampled_from(PRECISIONS), extra=st.sampled_from([
           [], ["--json"], ["--impl", "textbook"], ["--impl", "jax"], ["--tolerance", "nan"],
           ["--set", "optimizer.betas=[1.5, 0.9]"], ["--set", "optimizer.nesterov=true"], ["-n", "2"],
           ["--parallel", "ddp", "-n", "100000"], ["--plot", "/proc/x.png"], ["--show-state", "--json"],
           ["--timeline", "--json"]]))
def test_verify_tiny_never_crashes(dim: int, layers: int, batch: str, optimizer: str, precision: str,
                                   extra: list[str]) -> None:
    """verify on the CPU with tiny MLPs only (each real run takes well under a second)."""
    pytest.importorskip("torch")
    check(["verify", "-d", "cpu", "--set", f"model.dim={dim}", "--set", f"model.num_layers={layers}",
           "--set", f"training.batch_size={batch}", "-o", optimizer, "-p", precision, *extra])
