"""The single-device CUDA peak at any batch from the step at two batches, without simulating it again.

For a fixed order of events every event's size is affine in ``training.batch_size`` (an activation
is ``batch x`` a per-sample size, a parameter or an optimizer tensor does not depend on it; issue 8:
"the peak is piecewise-linear in the batch for a fixed event order"). So, given the step's unrounded
programs (``simulate.CompressedStep.exact_programs``, or the flat unrounded lists) at two batches
``b1 < b2`` whose events agree in name, role and phase, position by position, segment by segment,
each event's size is ``a + c·b`` with ``c = (s2 - s1) / (b2 - b1)`` (an integer, else no model) and
the peak at ``b`` is one pass over the distinct events: every size rounded up to CUDA's 512-byte
blocks (``simulate.round_blocks``), the highest prefix sum of each block (``k`` copies in a row: the
last copy's if a copy grows, else the first's, as ``timeline.Summary.repeat``), composed in order.

This is a predictor, not the answer: ``fit.largest_single_batch`` confirms the batch it predicts
with two real simulations (the batch fits, the next does not), so a size that is not affine
everywhere (a routing split with remainders) costs a fallback, never a wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from estimator.config import Config
from estimator.events import Event
from estimator.periodic import Program, monotone_runs
from estimator.simulate import COMPRESS_ABOVE_LAYERS, CUDA_BLOCK, CompressedStep, round_size, simulate, step_events

#: one block of a program: (sizes as (a, c) per event, copies in a row)
_Block = tuple[tuple[tuple[int, int], ...], int]


def unrounded_programs(config: Config) -> tuple[Program, ...]:
    """Setup, first and steady step of ``config`` on CUDA before the 512-byte rounding: the compressed
    step's own programs when it has them (made by ``simulate``, which a later estimate of the same config
    reads from its cache), else the flat lists, one segment each (built alone: no replay of the events)."""
    from estimator.periodic import Segment

    layers = getattr(config.model, "num_layers", None)
    if isinstance(layers, int) and layers > COMPRESS_ABOVE_LAYERS:
        step = simulate(config, "cuda")
        if isinstance(step, CompressedStep) and step.exact_programs is not None:
            return step.exact_programs
    return tuple((Segment(tuple(events)),) if events else () for events in step_events(config, "cuda", rounded=False))


class AffinePeak:
    """``peak(b)``: the worst of the first- and steady-step CUDA peaks at batch ``b`` (see the module)."""

    def __init__(self, programs: tuple[tuple[_Block, ...], ...]) -> None:
        self.programs = programs

    @classmethod
    def fit(cls, at: tuple[int, Sequence[Program]], other: tuple[int, Sequence[Program]]) -> AffinePeak | None:
        """The model through two batches' programs; None where they do not line up or a size is not affine
        with an integer slope, or could change sign at some batch >= 1."""
        (b1, p1), (b2, p2) = at, other
        if b1 == b2 or len(p1) != len(p2):
            return None
        out: list[tuple[_Block, ...]] = []
        for prog1, prog2 in zip(p1, p2, strict=True):
            if len(prog1) != len(prog2):
                return None
            blocks: list[_Block] = []
            for s1, s2 in zip(prog1, prog2, strict=True):
                if s1.count != s2.count or len(s1.events) != len(s2.events):
                    return None
                sizes = _affine_sizes(s1.events, s2.events, b1, b2)
                if sizes is None:
                    return None
                blocks.append((sizes, s1.count))
            out.append(tuple(blocks))
        return cls(tuple(out))

    @classmethod
    def exact(cls, programs: Sequence[Program]) -> AffinePeak:
        """The step's own programs at one batch, sizes as they are (the peak at that batch, whatever ``b``)."""
        return cls(tuple(tuple((tuple((e.nbytes, 0) for e in s.events), s.count) for s in program)
                         for program in programs))

    def peak(self, batch: int) -> int:
        setup, first, steady = (_delta_and_rise(program, batch) for program in self.programs)
        live = setup[0]
        return max(live + first[1], live + first[0] + steady[1])


def _by_name_in_runs(events: Sequence[Event]) -> list[Event]:
    """The events with each run of allocations (or of frees) in one phase sorted by name
    (``periodic.monotone_runs``: its order changes neither what the run adds nor its highest prefix sum);
    the step's own order sorts those runs by size (``periodic.canonical``), which the batch may change."""
    out: list[Event] = []
    for start, end in monotone_runs(events):
        out += sorted(events[start:end], key=_order) if end - start > 1 else events[start:end]
    return out


def _order(e: Event) -> tuple[str, str, str, int]:
    """A run's order: the name less a ``#…`` suffix (the family's scratch tensors are named by object id),
    then the size (two such tensors in one run)."""
    return _stem(e.name), e.role, e.phase, abs(e.nbytes)


def _stem(name: str) -> str:
    return name.partition("#")[0]


def _affine_sizes(e1: Sequence[Event], e2: Sequence[Event], b1: int, b2: int) -> tuple[tuple[int, int], ...] | None:
    """Each event's (a, c) with size ``a + c·b``, the events paired by position (or, where the two lists
    part, by name within each run: ``_by_name_in_runs``); None where they do not pair or are not affine."""
    if any(x.name != y.name for x, y in zip(e1, e2, strict=True)):
        e1, e2 = _by_name_in_runs(e1), _by_name_in_runs(e2)
        if any(_stem(x.name) != _stem(y.name) for x, y in zip(e1, e2, strict=True)):
            return None
    out: list[tuple[int, int]] = []
    span = b2 - b1
    for x, y in zip(e1, e2, strict=True):
        if x.role != y.role or x.phase != y.phase:
            return None
        slope, left = divmod(y.nbytes - x.nbytes, span)
        if left:
            return None
        if (x.nbytes > 0 and slope < 0) or (x.nbytes < 0 and slope > 0) or (x.nbytes == 0 and slope):
            return None  # the size would reach zero, or change sign, at some batch: not one event order
        out.append((x.nbytes - slope * b1, slope))
    return tuple(out)


def _delta_and_rise(program: tuple[_Block, ...], batch: int) -> tuple[int, int]:
    """What the program adds to live bytes, and its highest prefix sum (0 when nothing rises above the start):
    the :class:`~estimator.timeline.Summary` arithmetic on sizes alone."""
    total = best = 0
    for sizes, count in program:
        if count <= 0:
            continue
        current = top = 0
        for a, c in sizes:
            n = a + c * batch
            if n % CUDA_BLOCK:
                n = round_size(n)
            current += n
            if current > top:
                top = current
        if top > 0:
            rise = total + top + (count - 1) * current if current > 0 else total + top
            if rise > best:
                best = rise
        total += current * count
    return total, best
