"""A live-tensor memory tracker for devices without allocator statistics (the CPU).

``torch.cuda.max_memory_allocated`` answers "what was the most tensor memory alive at once"; the
CPU allocator keeps no such statistic. :class:`LiveTensorTracker` rebuilds it from the outside: a
``TorchDispatchMode`` that sees the output of every ATen op, records each output's *storage* once
(a view shares its base's storage, so it costs nothing) and subtracts the storage's bytes when a
weak reference to the storage object fires, i.e. when the C++ storage is released. Tensors that
exist before tracking starts (parameters, the batch, optimizer state) are adopted with
:meth:`LiveTensorTracker.track_existing`, so the figure means what ``max_memory_allocated`` means:
all live tensor bytes on the device. See ``docs/measurement.md`` for what it can and cannot see.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from estimator.measure.settle import settle_worker_threads


def _patch_waits() -> list[tuple[Any, str, Any]]:
    """Settle after every wait on a collective (see ``settle.py``). Two waits escape this mode's dispatch:
    c10d ``Work.wait`` (DDP, ZeRO, FSDP2 and every ``async_op`` collective; a pybind method, not an op) and
    the wait an ``AsyncCollectiveTensor`` runs inside its own ``__torch_dispatch__``, where this mode does not
    see the ``wait_tensor`` op. Wrap both; returns what to restore (nothing outside a process group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return []
    import torch.distributed._functional_collectives as funcol

    saved = [(funcol, "wait_tensor", funcol.wait_tensor), (dist.Work, "wait", dist.Work.wait)]
    for owner, name, original in saved:
        setattr(owner, name, _settling(original))
    return saved


def _settling(wait: Any) -> Any:
    def settled(*args: Any, **kwargs: Any) -> Any:
        out = wait(*args, **kwargs)
        settle_worker_threads()
        return out

    return settled


def _restore(saved: list[tuple[Any, str, Any]]) -> None:
    for owner, name, original in saved:
        setattr(owner, name, original)


#: ``kind`` of a :class:`MemoryEvent`.
ALLOC, FREE, RESIZE, EXISTING = "alloc", "free", "resize", "existing"


#: The op whose return means a functional collective finished (its worker may still hold its tensors).
WAIT_TENSOR = "_c10d_functional.wait_tensor.default"


@dataclass(frozen=True)
class MemoryEvent:
    """One change of live bytes: a storage appeared, grew/shrank, or was released.

    ``op`` is the ATen op that produced the storage (``"existing"`` for adopted ones), also on its
    ``free`` record, so an allocation and its release can be matched by ``storage_id`` or by op.
    """

    kind: str  # "alloc" | "free" | "resize" | "existing"
    nbytes: int  # storage bytes: its size after alloc/resize/existing, the size released for free
    delta: int  # signed change of live bytes
    live_bytes: int  # live bytes right after the event
    phase: str
    op: str
    storage_id: int  # sequence number of the storage within this tracker
    shape: tuple[int, ...]  # shape of the tensor through which the storage was first seen
    dtype: str


class _Entry:
    """What the tracker remembers about one live storage."""

    __slots__ = ("dtype", "nbytes", "op", "ref", "shape", "sid")

    def __init__(self, sid: int, nbytes: int, op: str, shape: tuple[int, ...], dtype: str) -> None:
        self.sid, self.nbytes, self.op, self.shape, self.dtype = sid, nbytes, op, shape, dtype
        self.ref: weakref.ref | None = None


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of all live tensor storages on one device, with peaks per phase.

    Use as a context manager around the code to observe; set :attr:`phase` (or call
    :meth:`set_phase`) at phase boundaries. Frees are seen through weak references, so they keep
    being counted after the ``with`` block ends, as long as the tracker object lives.
    """

    def __init__(self, device: str | torch.device = "cpu", phase: str = "setup") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.phase_peaks: dict[str, int] = {}
        self.timeline: list[tuple[str, int]] = []
        self.events: list[MemoryEvent] = []
        self._phase = phase
        self._entries: dict[int, _Entry] = {}  # id(storage object) -> entry; the object is kept unique
        self._next_sid = 0
        self._lock = threading.RLock()  # CUDA backward runs on a device thread; weakref callbacks too
        self._saved_resize: list[Any] = []
        self._saved_wait: list[Any] = []
        self.phase_peaks[phase] = 0

    # ----------------------------------------------------------------- phases and peaks
    @property
    def phase(self) -> str:
        """The label attached to events from now on (e.g. ``"forward"``)."""
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        self.set_phase(name)

    def set_phase(self, name: str) -> None:
        """Start a phase; its peak starts at the bytes already live, even if it allocates nothing."""
        with self._lock:
            self._phase = name
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.live_bytes)

    def reset_peak(self) -> None:
        """Forget earlier peaks (like ``torch.cuda.reset_peak_memory_stats``): peak := live now."""
        with self._lock:
            self.peak_bytes = self.live_bytes
            self.phase_peaks = {self._phase: self.live_bytes}

    # ----------------------------------------------------------------- adopting tensors
    def track_existing(self, tensors: Iterable[torch.Tensor | None]) -> int:
        """Adopt tensors that existed before tracking (parameters, batch, optimizer state).

        Returns the bytes newly adopted; storages already tracked and tensors on other devices
        are skipped, ``None`` entries are allowed (e.g. ``p.grad``).
        """
        before = self.live_bytes
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._see(t, EXISTING, EXISTING)
        return self.live_bytes - before

    def live_storages(self) -> list[tuple[str, int, tuple[int, ...], str]]:
        """``(op, nbytes, shape, dtype)`` of every storage alive now, for debugging leaks."""
        with self._lock:
            return [(e.op, e.nbytes, e.shape, e.dtype) for e in self._entries.values()]

    # ----------------------------------------------------------------- the mode
    def __enter__(self) -> LiveTensorTracker:
        # ``UntypedStorage.resize_`` is not an ATen op (FSDP uses it), so watch it by hand.
        original = torch.UntypedStorage.resize_
        self._saved_resize.append(original)
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = original(storage, size)
            tracker._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        self._saved_wait.append(_patch_waits())
        super().__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc_val, exc_tb)
        torch.UntypedStorage.resize_ = self._saved_resize.pop()  # type: ignore[method-assign]
        _restore(self._saved_wait.pop())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        op = str(func)
        if op == WAIT_TENSOR:  # a collective finished: let its worker thread drop the tensors first
            settle_worker_threads()
        # lift_fresh* is how torch.tensor(data) surfaces: its output is new memory, not an alias.
        fresh = op.startswith("aten.lift_fresh")
        input_ids: set[int] | None = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            kind = ALLOC
            if not fresh and not self._is_tracked(t):
                # An untracked storage that aliases an input existed before we looked: adopt it.
                if input_ids is None:
                    input_ids = self._storage_ids(tree_flatten((args, kwargs))[0])
                if any(id(s) in input_ids for s in self._storages(t)):
                    kind = EXISTING
            self._see(t, op, kind)
        return out

    # ----------------------------------------------------------------- bookkeeping
    def _storages(self, t: torch.Tensor) -> list[torch.UntypedStorage]:
        """The storages behind ``t`` on the tracked device (several for wrapper subclasses)."""
        if is_traceable_wrapper_subclass(t):
            attrs, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
            inner = [getattr(t, a) for a in attrs]
            return [s for x in inner if isinstance(x, torch.Tensor) for s in self._storages(x)]
        dev = t.device
        if dev.type != self.device.type or (self.device.index is not None and dev.index != self.device.index):
            return []
        try:
            return [t.untyped_storage()]
        except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers: no storage
            return []

    def _storage_ids(self, flat: list[Any]) -> set[int]:
        return {id(s) for x in flat if isinstance(x, torch.Tensor) for s in self._storages(x)}

    def _is_tracked(self, t: torch.Tensor) -> bool:
        return all(id(s) in self._entries for s in self._storages(t))

    def _see(self, t: torch.Tensor, op: str, kind: str) -> None:
        """Record the storages of ``t`` if new; notice a changed size if already known."""
        for st in self._storages(t):
            with self._lock:
                entry = self._entries.get(id(st))
                if entry is not None:
                    self._check_size(entry, st)
                    continue
                nbytes = st.nbytes()
                entry = _Entry(self._next_sid, nbytes, op, tuple(t.shape), str(t.dtype).replace("torch.", ""))
                self._next_sid += 1
                key = id(st)
                entry.ref = weakref.ref(st, lambda _ref, key=key, entry=entry: self._released(key, entry))
                self._entries[key] = entry
                self._record(kind, entry, nbytes, nbytes)

    def _resized(self, st: torch.UntypedStorage) -> None:
        with self._lock:
            entry = self._entries.get(id(st))
            if entry is not None:
                self._check_size(entry, st)

    def _check_size(self, entry: _Entry, st: torch.UntypedStorage) -> None:
        nbytes = st.nbytes()
        if nbytes != entry.nbytes:
            delta, entry.nbytes = nbytes - entry.nbytes, nbytes
            self._record(RESIZE, entry, nbytes, delta)

    def _released(self, key: int, entry: _Entry) -> None:
        """Weakref callback: the C++ storage died, so its bytes are no longer live."""
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
                self._record(FREE, entry, entry.nbytes, -entry.nbytes)

    def _record(self, kind: str, entry: _Entry, nbytes: int, delta: int) -> None:
        if delta == 0:
            return  # zero-byte storages are tracked (they may be resized) but make no event
        self.live_bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        phase = self._phase
        if self.live_bytes > self.phase_peaks.get(phase, 0):
            self.phase_peaks[phase] = self.live_bytes
        self.timeline.append((phase, self.live_bytes))
        self.events.append(
            MemoryEvent(
                kind, nbytes, delta, self.live_bytes, phase, entry.op, entry.sid, entry.shape, entry.dtype
            )
        )
