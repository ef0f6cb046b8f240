"""The CPU allocator's own record of a run, taken with no dispatch mode active (torch.profiler).

Why not the live-tensor tracker: it is a ``TorchDispatchMode``, and while any dispatch mode is
active torch treats every tensor as "subclass-like" (``at::isTensorSubclassLike`` returns true when
``c10::impl::dispatch_mode_enabled()``, ``ATen/TensorSubclassLikeUtils.h``). The autograd engine
then stops summing a node's fan-in gradients in place (``InputBuffer::accumulate`` in
``torch/csrc/autograd/input_buffer.cpp`` calls ``old_var.add_(var)`` only if
``can_accumulate_inplace(old_var) && !isTensorSubclassLike(var)``) and allocates ``old + var``
instead. Any model that reuses a tensor or a parameter within a step is then measured with a
transient extra copy per accumulation that the real step never makes (``docs/measurement.md``).

``torch.profiler.profile(profile_memory=True)`` needs no dispatch mode: the CPU allocator reports
every allocation and free (``c10::reportMemoryUsageToProfiler``). Each record sits in the
profiler's event tree under the ATen op that made it, which splits the allocator's bytes in two:

* blocks an ATen op returned (its output storages): exactly what a dispatch mode would see if it
  did not change the step, and what the estimate models;
* blocks no ATen op returned: *op-internal* ones, allocated and freed inside one outermost ATen op
  (kernel workspaces, a number wrapped inside ``add_(1)``, ``mse_loss``'s second buffer), and
  blocks allocated outside any op (a number wrapped by Python's argument parser for ``x * 0.5``,
  which ``MulBackward`` may keep until backward; ``torch.utils.checkpoint``'s
  ``torch.get_rng_state()`` stash, 5,056 B per checkpointed call), except ``torch.tensor(data)``,
  whose block ``aten::lift_fresh`` returns.

The allocator's total, both kinds included, is the CPU's counterpart of
``torch.cuda.max_memory_allocated`` (which also counts kernel workspaces, rounded to 512 B).

Phases are marked with profiler annotations (``estimator:<label>``); blocks allocated before the
profile started are not reported when freed (the reporter does not know their size), so a run
is profiled from before its model is built.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

MARK = "estimator:"


@dataclass
class AllocatorSample:
    """Live bytes right after one allocator record."""

    label: str  # the phase annotation the record fell in ("" before the first)
    total: int  # every block the allocator has handed out and not got back
    internal: int  # of which blocks no ATen op returned (op-internal, or allocated outside any op)
    op: str = ""  # the outermost ATen op the record fell in ("" outside any)
    nbytes: int = 0  # the record's signed size

    @property
    def tensors(self) -> int:
        """Bytes of the tensors the step's ATen ops returned: the allocator's total less the other blocks."""
        return self.total - self.internal


@dataclass
class AllocatorTrace:
    """All allocator records of a profiled run, in order, with the label each fell in."""

    samples: list[AllocatorSample] = field(default_factory=list)
    label_starts: dict[str, int] = field(default_factory=dict)  # label -> index of its first sample

    def live_before(self, label: str) -> AllocatorSample:
        """Live bytes when ``label`` began (after the last record before it)."""
        start = self.label_starts.get(label)
        if start is None:
            raise KeyError(label)
        return self.samples[start - 1] if start > 0 else AllocatorSample("", 0, 0)

    def within(self, label: str) -> list[AllocatorSample]:
        """The samples recorded while ``label`` was the running annotation."""
        return [s for s in self.samples if s.label == label]


class PhaseMarks:
    """Profiler annotations that close the running phase and open the next: ``marks("step/forward")``."""

    def __init__(self) -> None:
        self._handle: Any = None

    def __call__(self, label: str) -> None:
        self.close()
        self._handle = torch.ops.profiler._record_function_enter_new(MARK + label, None)

    def close(self) -> None:
        if self._handle is not None:
            torch.ops.profiler._record_function_exit._RecordFunction(self._handle)
            self._handle = None


def profile_allocations(fn: Callable[[PhaseMarks], None]) -> AllocatorTrace:
    """Run ``fn(marks)`` under ``torch.profiler.profile(profile_memory=True)``; its allocator records.

    Nothing else is active: no dispatch mode, no saved-tensor hooks, so the run is the real step.
    """
    from torch.profiler import ProfilerActivity, profile

    marks = PhaseMarks()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        try:
            fn(marks)
        finally:
            marks.close()
    roots = prof.profiler.kineto_results.experimental_event_tree()  # type: ignore[union-attr]
    return _trace(roots)


def _walk(roots: list[Any]) -> Iterator[tuple[Any, str, Any]]:
    """Pre-order walk in time order: (event, running label, outermost enclosing ATen op or None)."""
    stack: list[tuple[Any, str, Any]] = [(r, "", None) for r in sorted(roots, key=lambda e: e.start_time_ns)][::-1]
    while stack:
        ev, label, aten = stack.pop()
        name = ev.name
        if name.startswith(MARK):
            label = name[len(MARK):]
        elif aten is None and name.startswith("aten::"):
            aten = ev
        yield ev, label, aten
        children = sorted(ev.children, key=lambda e: e.start_time_ns)
        stack.extend((c, label, aten) for c in reversed(children))


def _lifted(op_starts: list[int], op_names: list[str], alloc: int) -> bool:
    """Whether the first ATen op after the block at ``alloc`` is ``aten::lift_fresh`` (torch.tensor's)."""
    k = bisect.bisect_right(op_starts, alloc)
    return k < len(op_names) and op_names[k].startswith("aten::lift_fresh")


def _trace(roots: list[Any]) -> AllocatorTrace:
    from torch._C._profiler import _EventType

    # In time order: a phase annotation (label, None...) or a CPU allocator record
    # (label, ptr, signed bytes, outermost ATen op).
    items: list[tuple[str, int, int, Any]] = []
    marks: set[int] = set()  # indices of annotations
    ops: list[tuple[int, str]] = []  # (index in items, name) of each outermost ATen op as it starts
    for ev, label, aten in _walk(roots):
        if ev.name.startswith(MARK):
            marks.add(len(items))
            items.append((label, 0, 0, None))
        elif aten is ev:
            ops.append((len(items), ev.name))
        elif ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            items.append((label, int(ev.extra_fields.ptr), int(ev.extra_fields.alloc_size), aten))
    # Pair each free with its allocation. A block allocated and freed inside one outermost ATen op
    # is op-internal (no op returned it) from its allocation on.
    open_blocks: dict[int, int] = {}  # ptr -> index of its allocation
    internal: set[int] = set()  # indices of the allocations and frees of blocks no ATen op returned
    paired: set[int] = set()  # frees whose allocation was recorded
    frees: dict[int, tuple[int, ...]] = {}  # allocation index -> index of its free
    for i, (_, ptr, size, aten) in enumerate(items):
        if i in marks:
            continue
        if size > 0:
            open_blocks[ptr] = i
        elif size < 0 and ptr in open_blocks:
            j = open_blocks.pop(ptr)
            paired.add(i)
            frees[j] = (i,)
            owner = items[j][3]
            if owner is not None and owner is aten:
                internal.update((i, j))
    # A block allocated outside any ATen op is no op's output either (a number wrapped by Python's
    # argument parser, torch.utils.checkpoint's torch.get_rng_state() stash), unless it is the data
    # of torch.tensor(...), which the next op, aten::lift_fresh, returns.
    op_starts, op_names = [index for index, _ in ops], [name for _, name in ops]
    for j, (_, _, size, aten) in enumerate(items):
        if size > 0 and aten is None and j not in marks and not _lifted(op_starts, op_names, j):
            internal.add(j)
            internal.update(i for i in frees.get(j, ()))
    trace = AllocatorTrace()
    total = inside = 0
    for i, (label, _, size, aten) in enumerate(items):
        if i in marks:
            trace.label_starts.setdefault(label, len(trace.samples))
            continue
        if size == 0 or (size < 0 and i not in paired):
            continue  # a free of a block from before the profile: its size is not reported
        total += size
        if i in internal:
            inside += size
        trace.samples.append(AllocatorSample(label, total, inside, aten.name if aten is not None else "", size))
    return trace
