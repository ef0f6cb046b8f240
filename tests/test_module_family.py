"""The module family: any nn.Module, traced on the meta device, checked against real CPU steps.

The modules are the shipped examples (``estimator.measure.examples``), the seed's Cruncher and the
project's transformer; the broken factories are written to a temporary package for each test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from estimator import EstimatorError
from estimator.api import estimate
from estimator.loader import load_config, validate_config

torch = pytest.importorskip("torch")

from estimator.families.module import ModuleConfig, _trace_cached, trace_module  # noqa: E402
from estimator.measure import verify as verify_module  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MLP = {"module": "estimator.measure.examples:make_mlp", "kwargs": {"in_dim": 16, "hidden": 64, "out_dim": 4},
       "inputs": [{"shape": [8, 16]}]}
LORA = {"module": "estimator.measure.examples:make_lora_mlp", "kwargs": {"in_dim": 32, "hidden": 64, "out_dim": 8,
                                                                       "rank": 4},
        "inputs": [{"shape": [8, 32]}]}
TINY_LM = {"module": "estimator.measure.examples:make_tiny_lm", "kwargs": {"vocab": 64, "dim": 32},
           "inputs": [{"shape": [2, 8], "dtype": "int64", "high": 64}], "loss": "cross_entropy"}
SMALL_LLAMA = {"name": "llama-2-7b", "d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
               "d_ff": 128, "vocab_size": 100}


def config(model: dict[str, Any], precision: str = "fp32", optimizer: str = "adam", **training: Any) -> Any:
    return validate_config({"model": model, "training": {"precision": precision, **training},
                            "optimizer": {"name": optimizer}})


@pytest.fixture
def run_verify() -> Any:
    """``run_verify`` on the CPU."""
    return lambda cfg: verify_module.run_verify(cfg, "cpu")


def mismatches(result: Any, skip: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    return [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured and r.key not in skip]


# --------------------------------------------------------------------------- (a) an nn.Linear MLP
def test_mlp_parameters_are_exact() -> None:
    est = estimate(config(MLP), "cpu")
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4))
    assert est.parameters == sum(p.numel() for p in model.parameters()) == 16 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4
    assert [(p.name, p.shape) for p in trace_module(est.config.model).parameters] == [
        (name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert est.trainable_parameters == est.parameters


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mlp_matches_a_real_cpu_step(run_verify: Any, precision: str, optimizer: str) -> None:
    result = run_verify(config(MLP, precision, optimizer))
    peak = next(r for r in result.rows if r.key == "peak_bytes")
    assert abs(peak.measured - peak.estimated) <= 0.01 * peak.estimated
    assert mismatches(result) == []  # in fact every figure is exact, the peak to the byte


def test_mlp_under_autocast_matches_a_real_cpu_step(run_verify: Any) -> None:
    assert mismatches(run_verify(config(MLP, "amp-bf16", "adamw"))) == []


# --------------------------------------------------------------------------- (b) the seed's Cruncher
@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp-bf16"])
@pytest.mark.parametrize("optimizer", ["adagrad", "adam", "sgd"])
def test_cruncher_traced_equals_the_analytic_mlp_family(precision: str, optimizer: str) -> None:
    analytic = config({"dim": 8, "num_layers": 3}, precision, optimizer, batch_size=4)
    traced = config({"module": "estimator.measure.mlp:build_cruncher", "kwargs": {"dim": 8, "num_layers": 3},
                     "inputs": [{"shape": [4, 8]}]}, precision, optimizer)
    for device in ("cpu", "cuda"):
        a, b = estimate(analytic, device).to_json(), estimate(traced, device).to_json()
        a.pop("config"), b.pop("config")
        # the module family's activation term is what autograd saves (the MLP keeps the seed's B·D·layers)
        assert b["memory"].pop("activations") == a["saved_activations"]
        b["memory"].pop("total"), a["memory"].pop("activations"), a["memory"].pop("total")
        assert a == b  # parameters, other memory terms, FLOPs (rule and matmul), both peaks, roles at the peak


def test_cruncher_seed_example_numbers() -> None:
    est = estimate(config({"module": "estimator.measure.mlp:build_cruncher", "kwargs": {"dim": 4, "num_layers": 2},
                           "inputs": [{"shape": [2, 4]}]}, optimizer="adagrad"), "cpu")
    # the seed's 496 B counts B·D·layers = 64 B of activations; autograd also keeps the head's output (8 B)
    assert est.memory.activations == est.saved_activation_bytes == 72
    assert (est.memory.total, est.flops.per_step, est.peak_bytes, est.flops.matmul) == (496 + 8, 432, 628, 368)


# --------------------------------------------------------------------------- (c) frozen weights (LoRA)
def test_lora_frozen_weights_get_no_gradient_and_no_state() -> None:
    est = estimate(config(LORA, optimizer="adam"), "cpu")
    params = {p.name: p for p in trace_module(est.config.model).parameters}
    adapters = {n for n in params if "lora_" in n}
    assert adapters == {"0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b"}
    assert all(p.trainable == (n in adapters) for n, p in params.items())
    adapter_numel = sum(params[n].numel for n in adapters)
    assert adapter_numel == 4 * 32 + 64 * 4 + 4 * 64 + 8 * 4
    assert est.trainable_parameters == adapter_numel
    assert est.memory.gradients == 4 * adapter_numel
    assert est.memory.optimizer_state == 2 * 4 * adapter_numel  # Adam's exp_avg and exp_avg_sq
    assert est.memory.parameters == 4 * est.parameters  # frozen weights still take memory
    grads = [e.name for e in est.step.steady_step if e.role == "gradient" and e.nbytes > 0]
    assert sorted(grads) == sorted(f"{n}.grad" for n in adapters)
    # P of the 6·B·P rule counts the frozen weights too (they are in the forward); the measured
    # backward is smaller than 4·B·P because no weight gradient is computed for them
    assert est.flops.forward == 2 * 8 * est.parameters
    assert est.flops.matmul - est.flops.matmul_forward < est.flops.backward


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lora_matches_a_real_cpu_step(run_verify: Any, precision: str, optimizer: str) -> None:
    result = run_verify(config(LORA, precision, optimizer))
    assert mismatches(result) == []
    rows = {r.key: r.measured for r in result.rows}
    assert rows["gradients"] == 4 * (4 * 32 + 64 * 4 + 4 * 64 + 8 * 4)


def test_lora_adagrad_matches_a_real_cpu_step(run_verify: Any) -> None:
    """verify hands torch.optim only the trainable parameters, so Adagrad's constructor makes no
    state for the frozen base (what the estimate assumes, and what HF's Trainer does)."""
    assert mismatches(run_verify(config(LORA, "fp32", "adagrad"))) == []


# --------------------------------------------------------------------------- buffers
@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_convnet_with_batchnorm_matches_a_real_cpu_step(run_verify: Any, precision: str) -> None:
    cfg = config({"module": "estimator.measure.examples:make_convnet", "inputs": [{"shape": [4, 3, 8, 8]}],
                  "loss": "cross_entropy"}, precision, "adam")
    result = run_verify(cfg)
    # every figure exact, with fp32 norm statistics under autocast; batch_norm also saves its running
    # statistics, which both sides count as module state (buffers), not as activations
    assert mismatches(result) == []
    state = [e for e in estimate(cfg, "cpu").step.setup if e.name.startswith("buffer:")]
    assert [(e.name, e.role, e.nbytes) for e in state] == [
        ("buffer:1.running_mean", "parameter", 32), ("buffer:1.running_var", "parameter", 32),
        ("buffer:1.num_batches_tracked", "parameter", 8)]


# --------------------------------------------------------------------------- token models
def test_tiny_lm_cross_entropy_default_target_and_flop_rule(run_verify: Any) -> None:
    cfg = config(TINY_LM, "amp-bf16", "adamw")
    trace = trace_module(cfg.model, "amp-bf16")
    assert trace.target is not None and (trace.target.shape, trace.target.dtype, trace.target.high) == \
        ((2, 8), "int64", 64)
    embedding = 64 * 32
    assert trace.flop_tokens == 16 and trace.flop_parameters == sum(p.numel for p in trace.parameters) - embedding
    assert mismatches(run_verify(cfg)) == []


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_transformer_as_a_module_matches_a_real_step_and_the_analytic_family(run_verify: Any, precision: str) -> None:
    module = {"module": "estimator.measure.transformer_factory:preset_model", "kwargs": SMALL_LLAMA,
              "inputs": [{"shape": [2, 16], "dtype": "int64", "high": 100}], "loss": "cross_entropy"}
    traced = config(module, precision, "adam")
    assert mismatches(run_verify(traced)) == []  # SDPA traced as the CPU flash kernel, as it runs
    analytic_model = {"preset": "llama-2-7b", **{k: v for k, v in SMALL_LLAMA.items() if k != "name"}}
    analytic = estimate(config(analytic_model, precision, "adam", batch_size=2, seq_len=16), "cpu")
    est = estimate(traced, "cpu")
    assert est.parameters == analytic.parameters
    assert est.flops.matmul == analytic.flops.matmul
    # the only difference: the training loop holds the logits (B·S·V) until the step ends
    logits = 2 * 16 * 100 * (4 if precision == "fp32" else 2)
    assert est.peak_bytes - analytic.peak_bytes == logits


def test_trace_is_cached_per_config_and_precision() -> None:
    cfg = config({**MLP, "kwargs": {"in_dim": 8, "hidden": 8, "out_dim": 2}, "inputs": [{"shape": [3, 8]}]},
                 "bf16")
    before = _trace_cached.cache_info()
    estimate(cfg, "cpu")
    estimate(cfg, "cuda")
    after = _trace_cached.cache_info()
    assert after.misses - before.misses == 2  # fp32 (the parameter list) and bf16, once each
    assert after.hits > before.hits


# --------------------------------------------------------------------------- config plumbing
def test_yaml_section_without_family_is_a_module(tmp_path: Path) -> None:
    path = tmp_path / "module.yaml"
    path.write_text(textwrap.dedent("""\
        model:
          module: estimator.measure.examples:make_mlp
          kwargs: {in_dim: 16, hidden: 32, out_dim: 4}
          inputs:
            - shape: [4, 16]
        optimizer: {name: sgd}
        """))
    cfg = load_config(path, ["model.kwargs.hidden=8"])
    assert isinstance(cfg.model, ModuleConfig) and cfg.model.kwargs["hidden"] == 8
    assert estimate(cfg, "cpu").parameters == 16 * 8 + 8 + 8 * 8 + 8 + 8 * 4 + 4


def test_float32_inputs_follow_the_precision() -> None:
    trace = trace_module(config(MLP).model, "bf16")
    assert [s.dtype for s in trace.inputs] == ["bfloat16"]
    assert trace_module(config(MLP).model, "amp-bf16").inputs[0].dtype == "float32"


# --------------------------------------------------------------------------- (d) bad input
BAD_MODULES = '''
import torch
from torch import nn

def boom(**kwargs):
    raise ValueError("no luck\\nsecond line")

def not_a_module():
    return [1, 2]

NOT_CALLABLE = 3

def embedding(device=None):
    return nn.Embedding(10, 4, device=device)

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y if y.sum() > 0 else -y
'''


OTHER_MODULES = '''
from torch import nn

class Unused(nn.Module):
    """Two inputs, a tuple output, and a layer forward never calls."""

    def __init__(self, device=None):
        super().__init__()
        self.used = nn.Linear(4, 4, device=device)
        self.unused = nn.Linear(4, 4, device=device)

    def forward(self, x, mask):
        return (self.used(x) * mask).sum(-1), x

class Tied(nn.Module):
    """The output head shares the embedding matrix."""

    def __init__(self, device=None):
        super().__init__()
        self.emb = nn.Embedding(20, 8, device=device)
        self.head = nn.Linear(8, 20, bias=False, device=device)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))
'''


@pytest.fixture
def bad_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "badmods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text(BAD_MODULES)
    (package / "other.py").write_text(OTHER_MODULES)
    (package / "import_fails.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "badmods"


TOKENS = [{"shape": [2, 3], "dtype": "int64", "high": 10}]


@pytest.mark.parametrize(("model", "expected"), [
    ({"module": "badmods.broken"}, "model.module: expected 'package.module:factory'"),
    ({"module": "badmods/broken:boom"}, "model.module: expected 'package.module:factory'"),
    ({"module": "badmods.missing:make"}, "model.module: no module named 'badmods.missing'"),
    ({"module": "no_such_package_xyz:make"}, "model.module: no module named 'no_such_package_xyz'"),
    ({"module": "badmods.import_fails:make"}, "model.module: importing 'badmods.import_fails' failed: "
                                               "ModuleNotFoundError"),
    ({"module": "badmods.broken:nothere"}, "model.module: 'badmods.broken' has no attribute 'nothere'"),
    ({"module": "badmods.broken:NOT_CALLABLE"}, "model.module: 'badmods.broken:NOT_CALLABLE' is not callable"),
    ({"module": "badmods.broken:boom"}, "model.module: badmods.broken:boom(**kwargs) raised ValueError: no luck"),
    ({"module": "badmods.broken:not_a_module"}, "model.module: badmods.broken:not_a_module returned a list, "
                                                 "not a torch.nn.Module"),
    ({"module": "badmods.broken:embedding", "inputs": [{"shape": [2, 3]}]},
     "model.inputs: badmods.broken:embedding forward on inputs [[2, 3] float32] failed: RuntimeError: Expected "
     "tensor for argument #1 'indices'"),
    ({"module": "badmods.broken:DataDependent", "inputs": [{"shape": [2, 4]}]},
     "model.module: badmods.broken:DataDependent forward on inputs [[2, 4] float32] depends on tensor values"),
    ({"module": "badmods.broken:embedding", "inputs": [{"shape": [2, 3], "dtype": "int64"}]},
     "model.inputs.0: an int64 input needs high"),
    ({"module": "badmods.broken:embedding", "inputs": [{"shape": [2, 0], "dtype": "int64", "high": 10}]},
     "model.inputs.0.shape.1: input should be greater than 0"),
    ({"module": "badmods.broken:embedding", "inputs": [{"shape": [2], "dtype": "float33"}]},
     "model.inputs.0.dtype: input should be"),
    ({"module": "badmods.broken:embedding", "inputs": []}, "model.inputs: list should have at least 1 item"),
    ({"module": "badmods.broken:embedding", "inputs": TOKENS, "kwargs": {"device": "cuda"}},
     "model.kwargs: 'device' is passed by estimator"),
    ({"module": "badmods.broken:embedding", "inputs": TOKENS, "loss": "sum", "target": {"shape": [2]}},
     "model: loss 'sum' takes no target"),
    ({"module": "badmods.broken:embedding", "inputs": TOKENS, "target": {"shape": [5, 7]}},
     "model.loss: mse of output (2, 3, 4) float32 and target (5, 7) float32 failed"),
])
@pytest.mark.filterwarnings("ignore:Using a target size")
def test_bad_input_is_one_line(bad_modules: str, model: dict[str, Any], expected: str) -> None:
    data = {"model": {"inputs": [{"shape": [2, 3]}], **model}}
    with pytest.raises(EstimatorError) as info:
        estimate(validate_config(data), "cpu")
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert problem.startswith(expected), problem
    assert "\n" not in problem


def test_training_options_the_module_family_cannot_honour(bad_modules: str) -> None:
    model = {"module": "badmods.broken:embedding", "inputs": TOKENS}
    with pytest.raises(EstimatorError, match="^training.activation_checkpointing: not applied to model.module"):
        estimate(config(model, activation_checkpointing="full"), "cpu")
    with pytest.raises(EstimatorError, match="^training.seq_len: the module family takes sequence lengths"):
        estimate(config(model, seq_len=3), "cpu")


def test_unused_layer_tuple_output_and_tied_weights(bad_modules: str, run_verify: Any) -> None:
    unused = config({"module": "badmods.other:Unused", "inputs": [{"shape": [3, 4]}, {"shape": [3, 4],
                                                                                      "dtype": "bool"}]})
    params = trace_module(unused.model).parameters
    assert [(p.name, p.trainable) for p in params] == [
        ("used.weight", True), ("used.bias", True), ("unused.weight", False), ("unused.bias", False)]
    assert mismatches(run_verify(unused)) == []  # torch.optim skips what gets no gradient
    tied = config({"module": "badmods.other:Tied", "inputs": [{"shape": [2, 5], "dtype": "int64", "high": 20}],
                   "loss": "cross_entropy"})
    trace = trace_module(tied.model)
    assert [p.name for p in trace.parameters] == ["emb.weight"]
    assert trace.flop_parameters == 160  # read by the head's matmul, so in P despite the lookup
    assert mismatches(run_verify(tied)) == []


# --------------------------------------------------------------------------- (e) no torch on the analytic path
def test_analytic_path_and_module_config_do_not_import_torch() -> None:
    code = textwrap.dedent("""\
        import json, sys
        import estimator
        from estimator import estimate, load_config
        from estimator.loader import validate_config
        est = estimate(load_config(), "cpu")
        cfg = validate_config({"model": {"module": "estimator.measure.examples:make_mlp",
                                         "inputs": [{"shape": [2, 16]}]}})
        print(json.dumps({"peak": est.peak_bytes, "family": cfg.model.family, "torch": "torch" in sys.modules}))
        """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert json.loads(out.stdout) == {"peak": 628, "family": "module", "torch": False}


@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_traced_transformer_module_with_checkpointing_matches_verify(run_verify: Any, ckpt: str) -> None:
    kwargs = {"name": "llama-2-7b", "vocab_size": 256, "d_model": 64, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "d_ff": 176, "max_seq_len": 32, "activation_checkpointing": ckpt}
    cfg = config({"module": "estimator.measure.transformer_factory:preset_model", "kwargs": kwargs,
                  "inputs": [{"shape": [2, 32], "dtype": "int64", "high": 256}], "loss": "cross_entropy"},
                 "fp32", "adamw")
    assert mismatches(run_verify(cfg)) == []
