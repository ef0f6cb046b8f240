"""The kernel corrections table against the real CPU kernels, and the modules that need it against verify.

Every entry of ``kernel_corrections.REAL_KERNEL_BYTES`` is run on real tensors and the bytes of the
storages the real kernel returns are compared with what the entry says; every entry of
``DISTINCT_OUTPUTS`` is checked to alias on fake tensors and not on real ones. Then LSTM/GRU/RNN models
and a linear layer on a transposed input are estimated and measured (verify's real CPU step).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest

from estimator.loader import validate_config

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from estimator.measure import verify as verify_module  # noqa: E402
from estimator.measure.kernel_corrections import (  # noqa: E402
    DISTINCT_OUTPUTS,
    REAL_KERNEL_BYTES,
    lstm_workspace_bytes,
    onednn_good_ld,
    separate_outputs,
)

aten = torch.ops.aten


class Capture(TorchDispatchMode):
    """Every call of ``op``: (args, kwargs, outputs)."""

    def __init__(self, op: Any) -> None:
        super().__init__()
        self.op, self.calls = op, []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is self.op:
            self.calls.append((args, kwargs or {}, [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]))
        return out


def checked(op: Any, run: Any) -> list[tuple[int, int]]:
    """(predicted, real) bytes of every output the entry corrects, over every call ``run`` makes of ``op``."""
    with Capture(op) as capture:
        run()
    assert capture.calls, f"{op} was not called"
    pairs = []
    for args, kwargs, outs in capture.calls:
        for index, nbytes in REAL_KERNEL_BYTES[op](args, kwargs, outs).items():
            pairs.append((nbytes, outs[index].untyped_storage().nbytes()))
    return pairs


def lstm_step(batch: int, steps: int, features: int, hidden: int, **kw: Any) -> Any:
    def run() -> None:
        lstm = torch.nn.LSTM(features, hidden, **kw)
        x = torch.randn(steps, batch, features) if not kw.get("batch_first") else torch.randn(batch, steps, features)
        lstm(x)[0].sum().backward()
    return run


def test_every_entry_is_checked_here() -> None:
    assert set(REAL_KERNEL_BYTES) == {aten.mse_loss.default, aten.native_batch_norm.default,
                                      aten.native_group_norm.default, aten.mkldnn_rnn_layer.default}
    assert set(DISTINCT_OUTPUTS) == {aten.mkldnn_rnn_layer_backward.default}


@pytest.mark.parametrize(("shape_a", "shape_b"), [((4, 3), (4, 3)), ((4, 3), (3,)), ((2, 1, 5), (3, 1))])
def test_mse_loss_returns_a_view_of_the_broadcast_buffer(shape_a: tuple, shape_b: tuple) -> None:
    a, b = torch.randn(shape_a), torch.randn(shape_b)
    for reduction in (1, 2):  # mean, sum
        pairs = checked(aten.mse_loss.default, lambda: aten.mse_loss(a, b, reduction))  # noqa: B023
        numel = torch.broadcast_shapes(shape_a, shape_b).numel()
        assert pairs == [(numel * 4, numel * 4)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_statistics_stay_float32_for_16_bit_inputs(dtype: torch.dtype) -> None:
    x = torch.randn(4, 6, 3, 3).to(dtype)
    w, b = torch.ones(6), torch.zeros(6)
    batch = checked(aten.native_batch_norm.default,
                    lambda: aten.native_batch_norm(x, w, b, torch.zeros(6), torch.ones(6), True, 0.1, 1e-5))
    group = checked(aten.native_group_norm.default, lambda: aten.native_group_norm(x, w, b, 4, 6, 9, 3, 1e-5))
    assert batch == [(6 * 4, 6 * 4)] * 2  # mean, inverse std: 6 channels in float32
    assert group == [(4 * 3 * 4, 4 * 3 * 4)] * 2  # per sample and group


def test_good_leading_dimension() -> None:
    # rounded up to 64 bytes; a multiple of 256 elements gets 64 bytes more
    assert [onednn_good_ld(d, 4) for d in (1, 16, 17, 64, 256, 512, 500)] == [16, 16, 32, 64, 272, 528, 528]


@pytest.mark.parametrize(("batch", "steps", "features", "hidden"),
                         [(2, 5, 8, 16), (1, 1, 1, 1), (4, 10, 8, 32), (5, 3, 100, 7), (16, 50, 32, 128),
                          (3, 9, 300, 50)])
def test_lstm_workspace_is_the_real_kernels(batch: int, steps: int, features: int, hidden: int) -> None:
    pairs = checked(aten.mkldnn_rnn_layer.default, lstm_step(batch, steps, features, hidden))
    assert pairs == [(lstm_workspace_bytes(batch, steps, features, hidden),) * 2]


def test_lstm_workspace_random_shapes_layers_and_directions() -> None:
    rng = random.Random(11)
    for _ in range(8):
        batch, steps, features, hidden = (rng.randint(1, 12), rng.randint(1, 12), rng.randint(1, 70),
                                          rng.randint(1, 70))
        run = lstm_step(batch, steps, features, hidden, num_layers=2, bidirectional=True, batch_first=True)
        pairs = checked(aten.mkldnn_rnn_layer.default, run)
        assert len(pairs) == 4  # one call per layer and direction
        assert all(predicted == real for predicted, real in pairs), (batch, steps, features, hidden, pairs)


def test_lstm_bias_gradients_are_two_storages_in_the_real_kernel() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = aten.mkldnn_rnn_layer_backward.default
    first, second = DISTINCT_OUTPUTS[op]
    with Capture(op) as real:
        lstm_step(2, 3, 4, 8)()
    (_, _, outs), = real.calls
    assert outs[first].untyped_storage()._cdata != outs[second].untyped_storage()._cdata
    with FakeTensorMode(allow_non_fake_inputs=True), Capture(op) as fake:
        lstm_step(2, 3, 4, 8)()
    (_, _, outs), = fake.calls
    assert outs[first].untyped_storage()._cdata == outs[second].untyped_storage()._cdata  # the meta kernel's
    fixed = separate_outputs(op, tuple(outs))
    assert fixed[first].untyped_storage()._cdata != fixed[second].untyped_storage()._cdata


# --------------------------------------------------------------------------- whole steps against verify
MODELS = '''
from torch import nn


class Recurrent(nn.Module):
    def __init__(self, kind="LSTM", features=8, hidden=16, layers=1, bidirectional=False):
        super().__init__()
        self.rnn = getattr(nn, kind)(features, hidden, num_layers=layers, bidirectional=bidirectional,
                                     batch_first=True)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class Transposed(nn.Module):
    """nn.Linear on a non-contiguous 3-D input: at::linear adds the bias in place."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 32)
        self.second = nn.Linear(32, 8)

    def forward(self, x):
        return self.second(self.first(x.transpose(0, 1)).transpose(0, 1))
'''


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kernel_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kernel_models", raising=False)


def verified(model: dict[str, Any], precision: str = "fp32", optimizer: str = "adam") -> Any:
    cfg = validate_config({"model": model, "training": {"precision": precision}, "optimizer": {"name": optimizer}})
    return verify_module.run_verify(cfg, "cpu")


@pytest.mark.parametrize(("kwargs", "precision"), [
    ({"kind": "LSTM"}, "fp32"),
    ({"kind": "LSTM", "layers": 2, "bidirectional": True}, "fp32"),
    ({"kind": "LSTM"}, "bf16"),
    ({"kind": "GRU", "layers": 2}, "fp32"),
    ({"kind": "RNN", "bidirectional": True}, "bf16"),
])
def test_recurrent_models_match_the_real_step(models: None, kwargs: dict[str, Any], precision: str) -> None:
    result = verified({"module": "kernel_models:Recurrent", "kwargs": kwargs, "inputs": [{"shape": [2, 5, 8]}]},
                      precision)
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []


def test_lstm_workspace_is_saved_for_backward(models: None) -> None:
    """1 layer, batch 2, 5 steps, 8 features, hidden 16: the workspace is 7 pages (28,672 B) of what verify
    measures as saved for backward, and the estimate has it too."""
    result = verified({"module": "kernel_models:Recurrent", "inputs": [{"shape": [2, 5, 8]}]}, "fp32", "sgd")
    saved = next(r for r in result.rows if r.key == "activations")
    assert lstm_workspace_bytes(2, 5, 8, 16) == 7 * 4096
    assert saved.estimated == saved.measured > 7 * 4096


def test_linear_on_a_transposed_input_adds_its_bias_in_place(models: None) -> None:
    result = verified({"module": "kernel_models:Transposed", "inputs": [{"shape": [4, 6, 8]}]}, "fp32", "sgd")
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []
    assert result.estimate.step.steady_curve() == result.measurement.real_steady_step.timeline  # point for point
