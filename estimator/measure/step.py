"""Run the seed's training step for real and measure its memory and FLOPs, on the CPU or an accelerator.

One code path for every device: a :class:`StepProbe` closes a phase by reading the peak since the
last reset and then resetting it, the way ``torch.cuda.reset_peak_memory_stats`` is meant to be
used. Only the source of the numbers differs: on the CPU a :class:`LiveTensorTracker` (which also
gives a per-event timeline), on CUDA/other accelerators the caching allocator's statistics.

Steps: (1) ``first_step`` creates the optimizer state lazily; (2) ``steady_step`` is the one the
estimator predicts, with ``saved_tensors_hooks`` recording what forward saves for backward (a pass-
through hook, checked not to change any allocation); (3) a step under ``FlopCounterMode``, kept out
of the memory figures; (4, CPU, optional) a step under the profiler for the allocator's own view.
"""

from __future__ import annotations

import contextlib
import gc
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from estimator import nogc
from estimator.errors import EstimatorError
from estimator.measure.tracker import LiveTensorTracker

STEP_PHASES: tuple[str, ...] = ("forward", "loss", "backward", "optimizer_step", "zero_grad")

Batch = tuple[tuple[Tensor, ...], Tensor]


@dataclass
class StepMeasurement:
    """Memory of one training step; every figure includes all bytes already live when it began."""

    peak_bytes: int  # max live bytes during the step, including everything live at its start
    start_bytes: int  # live bytes when the step began
    end_bytes: int  # after zero_grad and after the step's prediction and loss were dropped
    peak_phase: str  # "forward" | "loss" | "backward" | "optimizer_step" | "zero_grad"
    phase_peaks: dict[str, int]
    timeline: list[tuple[str, int]]  # (phase, live bytes): CPU every event; else start/peak/end per phase
    phase_start_bytes: dict[str, int] = field(default_factory=dict)  # live bytes when each phase began

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (the timeline as [phase, bytes] pairs)."""
        data = asdict(self)
        data["timeline"] = [[phase, nbytes] for phase, nbytes in self.timeline]
        return data


@dataclass
class Measurement:
    """What one real run of the step showed; byte counts are storage bytes on ``device`` only."""

    device: str
    first_step: StepMeasurement  # optimizer state created lazily inside this step
    steady_step: StepMeasurement  # second step, state already exists
    parameters: int  # bytes of all parameters
    gradients: int  # bytes of all .grad tensors right after backward (steady step)
    optimizer_state: int  # bytes of optimizer.state tensors after the step, excluding 'step' scalars
    optimizer_step_tensors: int  # bytes of the per-parameter 'step' tensors torch keeps (on this device)
    activations: int  # bytes saved for backward, deduplicated by storage, no parameters or inputs/targets
    inputs: int  # bytes of inputs + targets
    flops_matmul: int  # FlopCounterMode total for one step (forward + backward)
    cuda_reserved_bytes: int | None  # max_memory_reserved during the two measured steps (CUDA only)
    cuda_context_bytes: int | None  # driver/context overhead from mem_get_info (CUDA only)
    baseline_bytes: int = 0  # live bytes before the model was built (CUDA: the cuBLAS workspaces)
    uninstrumented: UninstrumentedRun | None = None  # CPU: the same steps with no dispatch mode, if asked

    @property
    def real_first_step(self) -> StepMeasurement:
        """The first step as it really runs: the uninstrumented run's where there is one."""
        return self.uninstrumented.first_step if self.uninstrumented is not None else self.first_step

    @property
    def real_steady_step(self) -> StepMeasurement:
        """The steady step as it really runs: the uninstrumented run's where there is one."""
        return self.uninstrumented.steady_step if self.uninstrumented is not None else self.steady_step

    @property
    def allocator_peak_bytes(self) -> int | None:
        """CPU: the steady step's peak as the allocator saw it, op-internal blocks included."""
        return self.uninstrumented.allocator_steady_peak if self.uninstrumented is not None else None

    def to_json(self) -> dict[str, Any]:
        """All byte and FLOP counts as ints (``None`` where not applicable), plus ``device``."""
        skip = ("first_step", "steady_step", "uninstrumented")
        data = {k: v for k, v in asdict(self).items() if k not in skip}
        data["first_step"] = self.first_step.to_json()
        data["steady_step"] = self.steady_step.to_json()
        data["uninstrumented"] = self.uninstrumented.to_json() if self.uninstrumented is not None else None
        return data


@dataclass
class UninstrumentedRun:
    """The same two steps on a fresh model with nothing observing them but the profiler (CPU).

    ``first_step``/``steady_step`` count the step's tensors: the allocator's blocks that an ATen op
    returned, which is what the estimate models and what the tracker would see if it did not change
    the step. ``allocator_*_peak`` add the blocks no op returned (kernel workspaces, wrapped scalars,
    checkpoint's RNG-state stash; ``estimator/measure/allocator.py``): the CPU's ``max_memory_allocated``.
    """

    first_step: StepMeasurement
    steady_step: StepMeasurement
    allocator_first_peak: int
    allocator_steady_peak: int

    @property
    def not_op_output_bytes(self) -> int:
        """How far the allocator's steady peak is above the tensors' (blocks no ATen op returned)."""
        return self.allocator_steady_peak - self.steady_step.peak_bytes

    def to_json(self) -> dict[str, Any]:
        return {"first_step": self.first_step.to_json(), "steady_step": self.steady_step.to_json(),
                "allocator_first_peak": self.allocator_first_peak,
                "allocator_steady_peak": self.allocator_steady_peak}


# --------------------------------------------------------------------------- devices
def resolve_device(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or another accelerator) -> a usable torch.device.

    Raises :class:`EstimatorError` with one readable line when the device cannot be used.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        acc = torch.accelerator.current_accelerator(check_available=True)
        if acc is not None:
            return torch.device(acc.type, torch.accelerator.current_device_index())
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise EstimatorError(f"device: unknown device '{spec}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise EstimatorError(f"device: '{spec}' was requested but {why}; use 'cpu'")
        count = torch.cuda.device_count()
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
    else:
        acc = torch.accelerator.current_accelerator(check_available=True)
        if acc is None or acc.type != device.type:
            raise EstimatorError(f"device: cannot run a training step on '{spec}' here; use auto, cpu, cuda")
        count = torch.accelerator.device_count()
    index = device.index if device.index is not None else 0
    if index >= count:
        raise EstimatorError(
            f"device: '{spec}' is out of range; this machine has {count} {device.type} device(s) "
            f"({device.type}:0..{device.type}:{count - 1})"
        )
    return torch.device(device.type, index)


def free_bytes(device: str | torch.device) -> int:
    """Bytes a new allocation could still get: device free memory, or MemAvailable on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return int(torch.accelerator.get_memory_info(device.index)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- memory sources
class _MemorySource(Protocol):
    """Where a probe reads live/peak bytes: the CPU tracker or an accelerator's caching allocator."""

    def synchronize(self) -> None: ...
    def allocated(self) -> int: ...
    def peak(self) -> int: ...
    def reset_peak(self) -> None: ...
    def label(self, phase: str) -> None: ...
    def adopt(self, tensors: Iterable[Tensor]) -> None: ...
    def events_mark(self) -> int: ...
    def events_since(self, mark: int) -> list[tuple[str, int]] | None: ...


class TrackerSource:
    """CPU: the live-tensor tracker; its timeline has one sample per allocation or free."""

    def __init__(self, tracker: LiveTensorTracker) -> None:
        self.tracker = tracker

    def synchronize(self) -> None:
        pass

    def allocated(self) -> int:
        return self.tracker.live_bytes

    def peak(self) -> int:
        return self.tracker.peak_bytes

    def reset_peak(self) -> None:
        self.tracker.reset_peak()

    def label(self, phase: str) -> None:
        self.tracker.set_phase(phase)

    def adopt(self, tensors: Iterable[Tensor]) -> None:
        self.tracker.track_existing(tensors)

    def events_mark(self) -> int:
        return len(self.tracker.timeline)

    def events_since(self, mark: int) -> list[tuple[str, int]] | None:
        return list(self.tracker.timeline[mark:])


class _AllocatorSource:
    """CUDA (torch.cuda) or another accelerator (torch.accelerator): the caching allocator's counters."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        api: Any = torch.cuda if device.type == "cuda" else torch.accelerator
        self._api = api
        self.reserved_peak = 0  # max_memory_reserved across the resets the probe makes

    def synchronize(self) -> None:
        self._api.synchronize(self.device)

    def allocated(self) -> int:
        return int(self._api.memory_allocated(self.device))

    def peak(self) -> int:
        return int(self._api.max_memory_allocated(self.device))

    def reset_peak(self) -> None:
        self.reserved_peak = max(self.reserved_peak, self.max_reserved())
        self._api.reset_peak_memory_stats(self.device)

    def reserved(self) -> int:
        return int(self._api.memory_reserved(self.device))

    def max_reserved(self) -> int:
        return int(self._api.max_memory_reserved(self.device))

    def mem_info(self) -> tuple[int, int]:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        else:
            free, total = torch.accelerator.get_memory_info(self.device.index)
        return int(free), int(total)

    def label(self, phase: str) -> None:
        pass

    def adopt(self, tensors: Iterable[Tensor]) -> None:
        pass  # the allocator counts every block, however it was made

    def events_mark(self) -> int:
        return 0

    def events_since(self, mark: int) -> list[tuple[str, int]] | None:
        return None


class StepProbe:
    """Per-phase peaks by resetting the peak counter at every phase boundary (same on every device)."""

    def __init__(self, source: _MemorySource, on_phase: Callable[[str], None] | None, label: str) -> None:
        self.source, self.on_phase, self.label = source, on_phase, label
        self.phase: str | None = None
        self.phase_peaks: dict[str, int] = {}
        self.phase_starts: dict[str, int] = {}
        self.samples: list[tuple[str, int]] = []

    def begin(self) -> None:
        self.source.synchronize()
        self.start = self.source.allocated()
        self.mark = self.source.events_mark()
        self.source.reset_peak()

    def enter(self, phase: str) -> None:
        """Close the running phase (its peak, its end sample) and start ``phase``."""
        self._close()
        if self.on_phase is not None:
            self.on_phase(f"{self.label}/{phase}")
        self.phase = phase
        self.source.label(phase)
        self.samples.append((phase, self.source.allocated()))
        self.phase_starts.setdefault(phase, self.samples[-1][1])

    def _close(self) -> None:
        self.source.synchronize()
        if self.phase is not None:
            peak = max(self.source.peak(), self.samples[-1][1])
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), peak)
            self.samples += [(self.phase, peak), (self.phase, self.source.allocated())]
        self.source.reset_peak()

    def end(self) -> StepMeasurement:
        self._close()
        end = self.source.allocated()
        peak = max([self.start, *self.phase_peaks.values()])
        peak_phase = max(self.phase_peaks, key=lambda p: self.phase_peaks[p]) if self.phase_peaks else ""
        timeline = self.source.events_since(self.mark)
        if timeline is not None:
            # the bytes live when the step began, as the estimate's curve starts (timeline.curve)
            first = next(iter(self.phase_starts), "forward")
            timeline = [(first, self.start), *timeline]
        return StepMeasurement(
            peak_bytes=peak,
            start_bytes=self.start,
            end_bytes=end,
            peak_phase=peak_phase,
            phase_peaks=dict(self.phase_peaks),
            timeline=self.samples if timeline is None else timeline,
            phase_start_bytes=dict(self.phase_starts),
        )


# --------------------------------------------------------------------------- helpers
def _storage_bytes(tensors: Iterable[Tensor | None], device: torch.device) -> int:
    """Bytes of the distinct storages behind ``tensors`` that live on ``device``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and _on_device(t, device):
            st = t.untyped_storage()
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


def _on_device(t: Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _state_tensors(optimizer: torch.optim.Optimizer, step: bool) -> Iterator[Tensor]:
    """Tensors in ``optimizer.state``: only the 'step' entries if ``step``, else all the others."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and (key == "step") == step:
                yield value


class _SavedTensorCounter:
    """A pass-through pack hook that adds up the storages forward saves for backward.

    A storage is one entry however often it is saved. Its address alone does not say which storage it
    is: a saved tensor can die during forward (DeepSeek's router saves some) and a later one take its
    address, which then dropped one of them from the count now and then. Each entry keeps a weak
    reference to its storage (torch preserves a storage's Python object while the storage lives), so a
    new storage at an old address is a new entry; the reference changes no lifetime.
    """

    def __init__(self, device: torch.device, exclude: Iterable[Tensor]) -> None:
        self.device = device
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude if _on_device(t, device)}
        self.saved: dict[tuple[int, int], int] = {}  # (address or id, generation) -> bytes
        self._current: dict[int, tuple[int, Any]] = {}  # address or id -> (generation, weak reference)

    def pack(self, t: Tensor) -> Tensor:
        if _on_device(t, self.device):
            with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without storage
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in self.excluded:
                    self._count(ptr or id(st), st)
        return t  # keep the tensor itself: no copy, no change of lifetime

    def _count(self, key: int, st: Any) -> None:
        generation, ref = self._current.get(key, (-1, None))
        if ref is None or ref() is not st:
            try:
                ref = weakref.ref(st)
            except TypeError:  # a storage type without weak references: by address alone, as before
                self.saved[(key, 0)] = st.nbytes()
                return
            generation += 1
            self._current[key] = (generation, ref)
        self.saved[(key, generation)] = st.nbytes()

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t

    @property
    def total(self) -> int:
        return sum(self.saved.values())


_frozen_depth = 0


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Leave everything alive now out of the cyclic collector until the block ends.

    Why: a process that imported torch (and, in a test run, everything before) holds hundreds of
    thousands of objects, and every full ``gc.collect()`` of :func:`gc_paused` scanned them all again:
    0.4 s each, 2.1 of a small CPU verify's 2.5 s. Frozen (``gc.freeze``), they are skipped; the
    collections still free every cycle made inside the block (the models, batches and steps measured
    here), which is what the measurements need. Garbage that existed before the block stays until a
    later collection, as it would have without us. Nested blocks freeze once.
    """
    global _frozen_depth
    _frozen_depth += 1
    if _frozen_depth == 1:
        gc.freeze()
    try:
        yield
    finally:
        _frozen_depth -= 1
        if _frozen_depth == 0:
            gc.unfreeze()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect now, then keep the cyclic GC from freeing tensors at arbitrary points of the step."""
    gc.collect()
    with nogc.gc_paused():
        yield


def _warm_up(device: torch.device) -> None:
    """Create the BLAS handles and workspaces (forward thread and autograd thread) before measuring."""
    a = torch.randn(16, 16, device=device, requires_grad=True)
    (a @ a).sum().backward()
    del a
    gc.collect()


# --------------------------------------------------------------------------- the step
class _Runner:
    """Holds what one training step needs and runs it, reporting phases to a probe."""

    def __init__(
        self,
        model: nn.Module,
        batch: Batch,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        accum_steps: int = 1,
    ) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.inputs, self.target = batch
        self.device, self.autocast_dtype = device, autocast_dtype
        self.accum_steps = accum_steps
        self.grad_bytes = 0

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def run(self, enter: Callable[[str], None], saved: _SavedTensorCounter | None = None) -> None:
        """The seed's step: forward, loss, backward, optimizer.step(), zero_grad(set_to_none=True).

        With ``accum_steps`` K > 1, K micro-batches of forward, loss and backward, each output and loss
        dropped after its backward, then one optimizer step (``estimator/accumulation.py``).
        """
        if self.accum_steps > 1:
            for micro in range(self.accum_steps):
                self._forward_backward(enter, saved if micro == 0 else None)
            self._step(enter)
            return
        pred, loss = self._forward_backward(enter, saved, keep=True)
        self._step(enter)
        del pred, loss  # the seed's loop keeps them until the next forward; we end the step clean

    def _forward_backward(self, enter: Callable[[str], None], saved: _SavedTensorCounter | None,
                          keep: bool = False) -> tuple[Any, Any]:
        hooks: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if saved is not None:
            hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack)
        enter("forward")
        with self._autocast(), hooks:
            if self.loss_fn is None:  # the model computes its own loss from (inputs, target)
                pred = None
                loss = self.model(*self.inputs, self.target)
            else:
                pred = self.model(*self.inputs)
                enter("loss")
                loss = self.loss_fn(pred, self.target)
        enter("backward")
        loss.backward()
        self.grad_bytes = _storage_bytes((p.grad for p in self.model.parameters()), self.device)
        if keep:
            return pred, loss
        del pred, loss
        return None, None

    def _step(self, enter: Callable[[str], None]) -> None:
        enter("optimizer_step")
        self.optimizer.step()
        enter("zero_grad")
        self.optimizer.zero_grad(set_to_none=True)

    def measured(
        self, source: _MemorySource, on_phase: Callable[[str], None] | None, label: str, **kw: Any
    ) -> StepMeasurement:
        probe = StepProbe(source, on_phase, label)
        with gc_paused():
            probe.begin()
            self.run(probe.enter, **kw)
            return probe.end()


@gc_frozen()  # a context manager made by contextmanager is a decorator too: one freeze per call
def measure_training_step(
    build_model: Callable[[], nn.Module],
    make_batch: Callable[[], Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    build_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    device: str | torch.device,
    autocast_dtype: torch.dtype | None = None,
    on_phase: Callable[[str], None] | None = None,
    uninstrumented: bool = False,
    accum_steps: int = 1,
) -> Measurement:
    """Build the model on ``device`` and measure two real training steps plus one FLOP-counted step.

    ``loss_fn=None`` means ``model(*inputs, target)`` returns the loss. ``on_phase`` is called with
    ``"setup"``, ``"first_step/forward"``, ..., ``"flops"`` (it must not allocate tensors on the
    device). ``uninstrumented`` (CPU only) first runs the two steps on a fresh model under the
    profiler alone (:class:`UninstrumentedRun`): the tracker is a dispatch mode, which changes how
    autograd sums gradients (``estimator/measure/allocator.py``).
    """
    device = torch.device(device)
    real = None
    if uninstrumented and device.type == "cpu":
        if on_phase is not None:
            on_phase("uninstrumented")
        real = measure_uninstrumented(build_model, make_batch, loss_fn, build_optimizer, device, autocast_dtype,
                                      accum_steps)
    if device.type == "cpu":
        tracker: LiveTensorTracker | None = LiveTensorTracker(device, phase="setup")
        source: _MemorySource = TrackerSource(tracker)
        outer: contextlib.AbstractContextManager[Any] = tracker
    else:
        tracker = None
        _warm_up(device)
        source = _AllocatorSource(device)
        outer = contextlib.nullcontext()
    measurement = _measure(
        build_model, make_batch, loss_fn, build_optimizer, device, autocast_dtype, on_phase, source, outer,
        accum_steps,
    )
    measurement.uninstrumented = real
    return measurement


def _measure(
    build_model: Callable[[], nn.Module],
    make_batch: Callable[[], Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    build_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    on_phase: Callable[[str], None] | None,
    source: _MemorySource,
    outer: contextlib.AbstractContextManager[Any],
    accum_steps: int = 1,
) -> Measurement:
    """The device-independent body of :func:`measure_training_step` (tests inject a fake source)."""
    if on_phase is not None:
        on_phase("setup")
    source.synchronize()
    baseline = source.allocated()
    with outer:
        model = build_model().to(device)
        inputs, target = make_batch()
        inputs = tuple(t.to(device) for t in inputs)
        target = target.to(device)
        # only what trains goes to the optimizer (frozen LoRA bases get no state, as in HF's Trainer)
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad])
        # tensors the builders did not create under the tracker (e.g. a batch cached in a closure)
        source.adopt([*model.parameters(), *model.buffers(), *inputs, target])
        runner = _Runner(model, (inputs, target), loss_fn, optimizer, device, autocast_dtype, accum_steps)

        first = runner.measured(source, on_phase, "first_step")
        saved = _SavedTensorCounter(device, [*model.parameters(), *model.buffers(), *inputs, target])
        steady = runner.measured(source, on_phase, "steady_step", saved=saved)
        gradients = runner.grad_bytes
        reserved = context = None
        if isinstance(source, _AllocatorSource):
            source.synchronize()
            free, total = source.mem_info()
            context = (total - free) - source.reserved()
            reserved = max(source.reserved_peak, source.max_reserved())
        optimizer_state = _storage_bytes(_state_tensors(optimizer, step=False), device)
        step_tensors = _storage_bytes(_state_tensors(optimizer, step=True), device)

        if on_phase is not None:
            on_phase("flops")
        with gc_paused(), FlopCounterMode(display=False) as counter:
            runner.run(lambda _phase: None)
        flops = int(counter.get_total_flops())

        parameters = _storage_bytes(model.parameters(), device)
        input_bytes = _storage_bytes([*inputs, target], device)
    return Measurement(
        device=str(device),
        first_step=first,
        steady_step=steady,
        parameters=parameters,
        gradients=gradients,
        optimizer_state=optimizer_state,
        optimizer_step_tensors=step_tensors,
        activations=saved.total,
        inputs=input_bytes,
        flops_matmul=flops,
        cuda_reserved_bytes=reserved,
        cuda_context_bytes=context,
        baseline_bytes=baseline,
    )


def measure_uninstrumented(
    build_model: Callable[[], nn.Module],
    make_batch: Callable[[], Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    build_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    accum_steps: int = 1,
) -> UninstrumentedRun:
    """Build a fresh model and run the first and the steady step with only the profiler watching (CPU).

    Profiled from before the model is built, so every block is known when it is freed and the
    totals are absolute. Everything is released again before this returns.
    """
    from estimator.measure.allocator import PhaseMarks, profile_allocations

    def body(marks: PhaseMarks) -> None:
        marks("setup")
        model = build_model().to(device)
        inputs, target = make_batch()
        inputs = tuple(t.to(device) for t in inputs)
        target = target.to(device)
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad])
        runner = _Runner(model, (inputs, target), loss_fn, optimizer, device, autocast_dtype, accum_steps)
        for label in ("first_step", "steady_step"):
            with gc_paused():
                runner.run(lambda phase, label=label: marks(f"{label}/{phase}"))
                marks(f"{label}/done")

    trace = profile_allocations(body)
    first, first_alloc = _allocator_step(trace, "first_step")
    steady, steady_alloc = _allocator_step(trace, "steady_step")
    return UninstrumentedRun(first, steady, first_alloc, steady_alloc)


def _allocator_step(trace: Any, label: str) -> tuple[StepMeasurement, int]:
    """One step of an :class:`~estimator.measure.allocator.AllocatorTrace`: tensor figures, allocator peak.

    A phase's peak starts at the bytes live when it began, as on every other source.
    """
    phases = [p for p in STEP_PHASES if f"{label}/{p}" in trace.label_starts]
    start = trace.live_before(f"{label}/{phases[0]}")
    timeline: list[tuple[str, int]] = [(phases[0], start.tensors)]
    phase_peaks: dict[str, int] = {}
    phase_starts: dict[str, int] = {}
    allocator_peak = start.total
    for phase in phases:
        before = trace.live_before(f"{label}/{phase}")
        phase_starts[phase] = before.tensors
        peak = before.tensors
        for sample in trace.within(f"{label}/{phase}"):
            peak = max(peak, sample.tensors)
            allocator_peak = max(allocator_peak, sample.total)
            if sample.tensors != timeline[-1][1]:  # blocks no op returned leave the tensors' curve flat
                timeline.append((phase, sample.tensors))
        phase_peaks[phase] = peak
    last = trace.within(f"{label}/{phases[-1]}")
    end = last[-1].tensors if last else trace.live_before(f"{label}/{phases[-1]}").tensors
    peak_phase = max(phase_peaks, key=lambda p: phase_peaks[p])
    step = StepMeasurement(
        peak_bytes=max(start.tensors, *phase_peaks.values()),
        start_bytes=start.tensors,
        end_bytes=end,
        peak_phase=peak_phase,
        phase_peaks=phase_peaks,
        timeline=timeline,
        phase_start_bytes=phase_starts,
    )
    return step, allocator_peak
