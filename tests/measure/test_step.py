"""Real training steps measured on the CPU, with the seed's Cruncher, against byte counts derived by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from estimator.errors import EstimatorError
from estimator.measure import step as step_module
from estimator.measure.mlp import build_cruncher
from estimator.measure.step import Measurement, free_bytes, measure_training_step, resolve_device
from estimator.measure.textbook import AdaGrad
from estimator.measure.tracker import LiveTensorTracker

B, D, LAYERS = 2, 4, 2  # the seed's example


def seed_batch() -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return (torch.randn(B, D),), torch.tensor([4.0, 5.0])


def measure_seed(build_optimizer, **kw) -> Measurement:
    torch.manual_seed(0)
    return measure_training_step(
        lambda: build_cruncher(D, LAYERS), seed_batch, F.mse_loss, build_optimizer, "cpu", **kw
    )


def test_seed_example_with_torch_adagrad() -> None:
    m = measure_seed(lambda p: torch.optim.Adagrad(p, lr=0.01))
    assert m.parameters == 144  # (4*4 + 4*4 + 4*1) floats
    assert m.gradients == 144
    assert m.optimizer_state == 144  # one 'sum' per parameter
    assert m.optimizer_step_tensors == 12  # three float32 'step' scalars
    assert m.inputs == 32 + 8
    assert m.flops_matmul == 368  # 6*B*P - 2*B*D^2: the first layer's input gradient is not computed
    assert m.activations == 72  # saved: h1, h2 (2x4 each) and pred (2,); x, y and the weights excluded

    # torch.optim.Adagrad creates its state in __init__, so it is live before the first step.
    # Steady step, event by event (bytes live after each):
    #   start  144 params + 40 batch + 144 sum + 12 step                            = 340
    #   forward  h1 = x@W1 +32, h2 = h1@W2 +32, pred = h2@Wf +8 (a (2,1) storage)    -> 412
    #   loss     mse_loss +8: the 0-d loss keeps a storage of B floats (CPU kernel)  -> 420
    #   backward ones_like +4, mse_loss_backward +8                                  -> 432
    #            MmBackward(final): dWf +16, dh2 +32; free dpred -8, free h2 -32      -> 480 then 440
    #            MmBackward(layer 2): dW2 +64, dh1 +32 (peak 536); free dh2, free h1  -> 472
    #            MmBackward(layer 1): dW1 +64 (no dx: x needs no grad); free dh1     -> 504
    #            end of backward: ones_like freed                                   -> 500
    #            (AccumulateGrad steals dW*, so no copies: 144 grad bytes)
    #   optimizer_step (for-loop Adagrad): per parameter `std = sum.sqrt().add_(eps)`; the previous
    #            parameter's `std` lives until the loop variable is rebound: 500 + 64 + 64 = 628 (peak)
    #   zero_grad frees the 144 grad bytes; we then drop pred and loss                -> 340
    steady = m.steady_step
    assert (steady.start_bytes, steady.peak_bytes, steady.end_bytes) == (340, 628, 340)
    assert steady.phase_peaks == {
        "forward": 412,
        "loss": 420,
        "backward": 536,
        "optimizer_step": 628,
        "zero_grad": 500,
    }
    assert steady.peak_phase == "optimizer_step"
    assert steady.phase_start_bytes == {
        "forward": 340,
        "loss": 412,
        "backward": 420,
        "optimizer_step": 500,
        "zero_grad": 500,
    }
    forward_to_backward = [
        340,  # the bytes live when the step began, as the estimate's curve starts
        372,
        404,
        412,
        420,
        424,
        432,
        448,
        480,
        472,
        440,
        504,
        536,
        504,
        472,
        536,
        504,
        500,
    ]
    assert [live for _, live in steady.timeline][:18] == forward_to_backward
    assert max(live for _, live in steady.timeline) == steady.peak_bytes
    first = m.first_step
    assert (first.start_bytes, first.peak_bytes, first.end_bytes) == (340, 628, 340)


def test_seed_example_with_the_seeds_adagrad() -> None:
    m = measure_seed(lambda p: AdaGrad(p, lr=0.01), uninstrumented=True)
    assert (m.parameters, m.gradients, m.optimizer_state, m.inputs) == (144, 144, 144, 40)
    assert m.optimizer_step_tensors == 0  # the seed keeps no step count
    # steady: start 144 + 40 + 144 ('g2') = 328; before the update 328 + 144 grads + 8 pred + 8 loss = 488.
    # Per parameter: zeros_like (the eagerly evaluated default of state.get) +64 -64; square +64 -64;
    # then lr*grad, g2+eps, sqrt(...) all live at once: 488 + 3*64 = 680 (the peak).
    assert (m.steady_step.start_bytes, m.steady_step.peak_bytes) == (328, 680)
    assert m.steady_step.phase_peaks["optimizer_step"] == 680
    # first step: start 184 (no state yet); at W2, g2 of W1 and W2 exist: 344 + 2*64 + 3*64 = 664
    assert (m.first_step.start_bytes, m.first_step.peak_bytes, m.first_step.end_bytes) == (184, 664, 328)
    assert m.allocator_peak_bytes is not None and m.allocator_peak_bytes >= m.steady_step.peak_bytes


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_relations_at_a_larger_size(name: str) -> None:
    dim, layers, batch = 256, 3, 32
    builders = {"sgd": lambda p: torch.optim.SGD(p, lr=0.01), "adam": lambda p: torch.optim.Adam(p)}
    torch.manual_seed(0)
    m = measure_training_step(
        lambda: build_cruncher(dim, layers),
        lambda: ((torch.randn(batch, dim),), torch.randn(batch)),
        F.mse_loss,
        builders[name],
        "cpu",
    )
    n_params = layers * dim * dim + dim
    assert m.parameters == m.gradients == 4 * n_params
    assert m.inputs == 4 * (batch * dim + batch)
    assert m.optimizer_state == {"sgd": 0, "adam": 2 * m.parameters}[name]
    assert m.optimizer_step_tensors == {"sgd": 0, "adam": 4 * (layers + 1)}[name]
    assert m.activations == 4 * (layers * batch * dim + batch)  # layer outputs and pred
    assert m.flops_matmul == 6 * batch * n_params - 2 * batch * dim * dim
    state = m.optimizer_state + m.optimizer_step_tensors
    first, steady = m.first_step, m.steady_step
    assert first.start_bytes == m.parameters + m.inputs  # Adam's state is created lazily
    assert steady.start_bytes == steady.end_bytes == first.end_bytes == m.parameters + m.inputs + state
    assert first.peak_bytes >= steady.peak_bytes - state
    assert first.peak_bytes <= steady.peak_bytes
    assert steady.phase_peaks["backward"] >= steady.start_bytes + m.gradients
    assert steady.phase_peaks["forward"] >= steady.start_bytes + m.activations
    assert steady.peak_bytes == max(steady.phase_peaks.values()) == max(v for _, v in steady.timeline)
    assert steady.phase_peaks[steady.peak_phase] == steady.peak_bytes
    assert list(steady.phase_peaks) == ["forward", "loss", "backward", "optimizer_step", "zero_grad"]
    if name == "sgd":  # torch's SGD updates in place (param.add_(grad, alpha=-lr)): no temporaries
        assert steady.phase_peaks["optimizer_step"] == steady.start_bytes + m.gradients + 4 * batch * 2
    json = m.to_json()
    assert json["device"] == "cpu" and json["steady_step"]["peak_bytes"] == steady.peak_bytes


def test_model_that_returns_its_loss() -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_cruncher(D, LAYERS)

        def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.net(x), target)

    m = measure_training_step(WithLoss, seed_batch, None, lambda p: torch.optim.SGD(p, lr=0.01), "cpu")
    assert "loss" not in m.steady_step.phase_peaks
    assert (m.parameters, m.flops_matmul, m.activations) == (144, 368, 72)


def test_autocast_saves_the_low_precision_copies() -> None:
    m = measure_seed(lambda p: torch.optim.SGD(p, lr=0.01), autocast_dtype=torch.bfloat16)
    # bf16 x (16), bf16 W2 (32) and h1 (16) for layer 2, bf16 Wf (8) and h2 (16) for the head, fp32 pred (8)
    assert m.activations == 16 + 32 + 16 + 8 + 16 + 8
    assert m.flops_matmul == 368


class _TrackerAsAllocator(step_module.TrackerSource):
    """The accelerator code path, fed by a tracker: peaks come only from resets at phase boundaries."""

    def events_since(self, mark: int) -> None:
        return None


def test_allocator_code_path_matches_the_tracker() -> None:
    """The CUDA logic (reset the peak at each phase boundary, read it at the next) run on the CPU."""

    def run(source_type):
        torch.manual_seed(0)
        tracker = LiveTensorTracker("cpu")
        return step_module._measure(
            lambda: build_cruncher(D, LAYERS),
            seed_batch,
            F.mse_loss,
            lambda p: torch.optim.Adam(p),
            torch.device("cpu"),
            None,
            None,
            source_type(tracker),
            tracker,
        )

    by_events, by_resets = run(step_module.TrackerSource), run(_TrackerAsAllocator)
    for a, b in [
        (by_events.first_step, by_resets.first_step),
        (by_events.steady_step, by_resets.steady_step),
    ]:
        assert (a.peak_bytes, a.start_bytes, a.end_bytes) == (b.peak_bytes, b.start_bytes, b.end_bytes)
        assert a.phase_peaks == b.phase_peaks
        assert len(b.timeline) == 3 * 5  # start, peak, end of each phase
        assert [v for p, v in b.timeline if p == "backward"][1] == b.phase_peaks["backward"]


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("banana", "cuda:x", ""):
        with pytest.raises(EstimatorError, match="unknown device"):
            resolve_device(bad)
    for unusable in ("meta", "mps:0" if not torch.backends.mps.is_available() else "meta"):
        with pytest.raises(EstimatorError, match="cannot run a training step on"):
            resolve_device(unusable)
    if not torch.cuda.is_available():
        accelerator = torch.accelerator.current_accelerator()
        assert resolve_device("auto").type == (accelerator.type if accelerator is not None else "cpu")
        with pytest.raises(EstimatorError, match="'cuda' was requested but") as info:
            resolve_device("cuda")
        assert "\n" not in str(info.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 1)  # the current device
    with pytest.raises(
        EstimatorError, match=r"'cuda:2' is out of range; this machine has 2 cuda device\(s\)"
    ):
        resolve_device("cuda:2")


def test_free_bytes_cpu() -> None:
    free = free_bytes("cpu")
    assert free > 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total = int(meminfo.read_text().split("MemTotal:")[1].split()[0]) * 1024
        assert free <= total


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seed_example_on_cuda() -> None:
    torch.manual_seed(0)
    m = measure_training_step(
        lambda: build_cruncher(D, LAYERS, "cuda"),
        seed_batch,
        F.mse_loss,
        lambda p: torch.optim.Adagrad(p, lr=0.01),
        "cuda",
    )
    assert (m.parameters, m.gradients, m.optimizer_state, m.inputs) == (144, 144, 144, 40)
    assert m.flops_matmul == 368
    assert m.optimizer_step_tensors == 0  # Adagrad keeps 'step' on the CPU unless capturable
    # every block is rounded up to 512 bytes: 3 params + 3 sums + x + y
    assert m.steady_step.start_bytes - m.baseline_bytes == 8 * 512
    assert m.steady_step.peak_bytes >= m.steady_step.start_bytes + 3 * 512  # + three gradients
    assert m.cuda_reserved_bytes is not None and m.cuda_reserved_bytes >= m.steady_step.peak_bytes
    assert m.cuda_context_bytes is not None and m.cuda_context_bytes > 0
    assert len(m.steady_step.timeline) == 15


def test_tensors_made_before_the_measurement_are_counted() -> None:
    x, y = seed_batch()  # made outside, before tracking starts
    m = measure_training_step(
        lambda: build_cruncher(D, LAYERS),
        lambda: (x, y),
        F.mse_loss,
        lambda p: torch.optim.SGD(p, lr=0.01),
        "cpu",
    )
    assert m.first_step.start_bytes == m.parameters + m.inputs == 144 + 40


class _Storage:
    def __init__(self, address: int, nbytes: int) -> None:
        self.address, self.size = address, nbytes

    def data_ptr(self) -> int:
        return self.address

    def nbytes(self) -> int:
        return self.size


class _Saved:
    """What the pack hook reads of a tensor: its device and its storage."""

    device = torch.device("cpu")

    def __init__(self, storage: _Storage) -> None:
        self.storage = storage

    def untyped_storage(self) -> _Storage:
        return self.storage


def test_saved_counter_tells_a_new_storage_at_a_freed_address() -> None:
    """A saved storage that dies in forward and a later one at its address are two entries (the address
    alone counted them once, 256 B short of the estimate in 2 of 19 DeepSeek-V3 verifies); the same
    storage saved twice is one."""
    counter = step_module._SavedTensorCounter(torch.device("cpu"), [])
    first = _Storage(4096, 128)
    counter.pack(_Saved(first))
    counter.pack(_Saved(first))
    assert counter.total == 128
    del first  # freed during forward: its address is free again
    later = _Storage(4096, 256)
    counter.pack(_Saved(later))
    counter.pack(_Saved(later))
    assert counter.total == 128 + 256
