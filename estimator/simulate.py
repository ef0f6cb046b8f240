"""One training step as tensor events: setup, the first step and a steady-state step.

The step is the seed's (section 5): forward, loss, backward, ``optimizer.step()``,
``optimizer.zero_grad(set_to_none=True)``. The model family says what forward and backward
allocate; the optimizer registry says what state and temporaries ``step()`` allocates; this module
puts them in order. Pure Python.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from estimator.accumulation import LATER, accumulated_body, after_backward, later_named_apart, named_apart
from estimator.config import Config
from estimator.events import Event, alloc, free
from estimator.families.base import ParamTensor, StepShape, get_family
from estimator.layouts import (
    master_copy_bytes,
    master_grad_events,
    master_grad_free_events,
    master_setup_events,
    master_weights,
    separate_master_copy,
)
from estimator.optimizers import OptimizerSpec, get_optimizer
from estimator.periodic import (
    BASE_LAYERS,
    Program,
    Segment,
    map_events,
    periodic_programs,
    program_length,
    role_bytes,
    summary_of,
)
from estimator.precision import DTYPE_BYTES, precision_plan, training_plan
from estimator.timeline import LiveTensor, Peak, curve, peak_of, replay, scan

STEP_TENSOR_BYTES = 4  # torch keeps 'step' as a float32 scalar tensor per parameter
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


@dataclass(frozen=True)
class SimulatedStep:
    """The events of one training run of two steps, and the peaks that follow from them."""

    setup: list[Event]
    first_step: list[Event]
    steady_step: list[Event]
    first_peak: Peak
    steady_peak: Peak
    live_before_first: dict[str, LiveTensor]
    live_before_steady: dict[str, LiveTensor]

    @property
    def saved_activation_bytes(self) -> int:
        """Bytes autograd saves for backward in one step (what saved_tensors_hooks sees)."""
        return sum(e.nbytes for e in self.steady_step if _is_saved(e))

    @property
    def saved_copy_bytes(self) -> int:
        """Autocast's 16-bit weight copies autograd keeps for backward (filed as temporaries, not activations)."""
        return sum(e.nbytes for e in self.steady_step if _is_cast_in_forward(e))

    @property
    def input_bytes(self) -> int:
        return sum(e.nbytes for e in self.setup if e.role == "input")

    @cached_property
    def programs(self) -> tuple[Program, Program, Program]:
        """The three event lists as one-segment programs (the form per-rank estimates compose)."""
        return (Segment(tuple(self.setup)),), (Segment(tuple(self.first_step)),), (Segment(tuple(self.steady_step)),)

    def body_events(self) -> list[Event]:
        """The steady step's events outside ``optimizer.step()`` and ``zero_grad``, in order."""
        return [e for e in self.steady_step if e.phase not in OUTSIDE_BODY]

    def first_curve(self) -> list[tuple[str, int]]:
        return curve(self.first_step, self.live_before_first)

    def steady_curve(self) -> list[tuple[str, int]]:
        return curve(self.steady_step, self.live_before_steady)


def _is_saved(e: Event) -> bool:
    """Saved for backward by one micro-batch (the tensors of later micro-batches are named ``…@later``)."""
    return e.nbytes > 0 and e.role == "activation" and e.phase in ("forward", "loss") and not e.name.endswith(LATER)


def _is_cast_in_forward(e: Event) -> bool:
    """An allocation or a free of a 16-bit copy autocast makes in forward (``….16bit``, filed as a temporary).

    Summed with their frees, these events leave the copies still alive when backward begins: those autograd
    saved (a linear's weight copy, for its input's gradient), which ``verify`` measures as saved for backward;
    the copies nothing saved (biases, checkpointed blocks') are freed as forward ends. The estimate's
    activations figure leaves them out (they scale with the parameters, not the batch); the peak has them.
    """
    return (e.role == "temporary" and e.phase in ("forward", "loss") and e.name.endswith(".16bit")
            and not e.name.endswith(LATER))


@dataclass(frozen=True)
class CompressedStep:
    """A :class:`SimulatedStep` of a model whose layers repeat, kept as programs (see ``periodic.py``).

    The peaks and sums come from the programs in O(distinct blocks); the flat event lists (for a
    timeline chart or a comparison with a measurement) are built only when asked for.
    """

    programs: tuple[Program, Program, Program]  # setup, first step, steady step
    first_peak: Peak
    steady_peak: Peak
    # the flat event lists of setup, the first and a steady step, built when asked for
    build_events: Callable[[], tuple[list[Event], list[Event], list[Event]]] = field(repr=False, compare=False)
    # the same programs before CUDA's 512-byte rounding (None when nothing was rounded)
    exact_programs: tuple[Program, Program, Program] | None = field(default=None, repr=False, compare=False)
    # the steady step's events outside the optimizer and zero_grad, built alone (None: filter the steady step)
    build_body: Callable[[], list[Event]] | None = field(default=None, repr=False, compare=False)

    def body_events(self) -> list[Event]:
        """The steady step's events outside ``optimizer.step()`` and ``zero_grad``, in order (flat, named)."""
        if self.build_body is not None and "_events" not in self.__dict__:
            return self.build_body()
        return [e for e in self.steady_step if e.phase not in OUTSIDE_BODY]

    def rounding_at(self, index: int) -> dict[str, int]:
        """Per role, the bytes CUDA's rounding adds to what is live after steady-step event ``index``
        (-1: at the start), from the programs: O(segments), nothing is flattened."""
        if self.exact_programs is None:
            return {}
        totals: dict[str, int] = {}
        for rounded, exact in zip(self.programs[:2], self.exact_programs[:2], strict=True):
            _add_roles(totals, _delta_program(rounded, exact), None)
        _add_roles(totals, _delta_program(self.programs[2], self.exact_programs[2]), index + 1)
        return {role: n for role, n in totals.items() if n}

    @cached_property
    def _events(self) -> tuple[list[Event], list[Event], list[Event]]:
        """The flat lists alone (a strategy that edits events by name needs no replay of them)."""
        return self.build_events()

    @cached_property
    def _flat(self) -> SimulatedStep:
        return assemble_step(*self._events)

    setup = property(lambda self: self._events[0])
    first_step = property(lambda self: self._events[1])
    steady_step = property(lambda self: self._events[2])
    live_before_first = property(lambda self: self._flat.live_before_first)
    live_before_steady = property(lambda self: self._flat.live_before_steady)

    @property
    def saved_activation_bytes(self) -> int:
        return role_bytes(self.programs[2], _is_saved)

    @property
    def saved_copy_bytes(self) -> int:
        return role_bytes(self.programs[2], _is_cast_in_forward)

    @property
    def input_bytes(self) -> int:
        return role_bytes(self.programs[0], lambda e: e.role == "input")

    def first_curve(self) -> list[tuple[str, int]]:
        return self._flat.first_curve()

    def steady_curve(self) -> list[tuple[str, int]]:
        return self._flat.steady_curve()


#: below this many layers the flat step is cheap enough; above it the periodic programs are tried (a search builds
#: 2 + 3 + 4 layers: about as much as a flat 12-layer step, half a 16-layer one)
COMPRESS_ABOVE_LAYERS = 8


def with_layers(config: Config, layers: int) -> Config:
    return config.model_copy(update={"model": config.model.model_copy(update={"num_layers": layers})})


def layered_step(config: Config, build: Callable[[Config], tuple[list[Event], list[Event], list[Event]]],
                 finish: Callable[[list[Event]], list[Event]] | None = None,
                 shape_key: Hashable | None = None,
                 body: Callable[[Config], list[Event]] | None = None) -> SimulatedStep | CompressedStep:
    """``build(config)``'s step (each list passed through ``finish``, e.g. CUDA's block rounding),
    compressed when the model's layers repeat and there are many of them. ``shape_key``: see
    ``periodic_programs`` (what ``build`` depends on besides sizes). ``body(config)``: the steady step's
    events outside the optimizer and zero_grad without the rest (a compressed step's ``body_events``)."""
    done = finish or (lambda events: events)

    def events() -> tuple[list[Event], list[Event], list[Event]]:
        setup, first, steady = build(config)
        return done(setup), done(first), done(steady)

    programs = _shared_body_programs(config, build, shape_key)
    if programs is None:
        programs = _periodic_lists(config, lambda c: list(build(c)), shape_key)
    if programs is not None:
        step = compressed_step(tuple(map_events(p, done) for p in programs), events,
                               programs if finish is not None else None)
        return step if body is None else replace(step, build_body=lambda: done(body(config)))
    return assemble_step(*events())


def _shared_body_programs(config: Config, build: Callable[[Config], tuple[list[Event], list[Event], list[Event]]],
                          shape_key: Hashable | None) -> tuple[Program, Program, Program] | None:
    """``build``'s setup, first and steady step as programs, the first and steady step cut into the events
    before ``optimizer.step()`` (the same objects in both steps), the optimizer's own, and the ``zero_grad``
    tail after it (the same in both): the shared parts are searched once and the steps' programs are
    concatenations, as :func:`_composed_step` composes the single-device step. None where the steps do not
    cut so (the whole lists are then searched)."""

    made: dict[int, list[list[Event]]] = {}

    def parts(c: Config) -> list[list[Event]]:
        n = c.model.num_layers  # type: ignore[union-attr]
        if n not in made:
            setup, first, steady = build(c)
            head = _shared_head(first, steady)
            tail = _shared_tail(first, steady, head)
            if not head:
                raise ValueError("the steps share no events before the optimizer")
            made[n] = [setup, first[:head], first[head:len(first) - tail], steady[head:len(steady) - tail],
                       first[len(first) - tail:]]
        return made[n]

    bases = _bases(config)
    if not bases:
        return None
    try:  # where the steps do not cut so, learn it from the smallest layer count, not from every base
        parts(with_layers(config, bases[0]))
    except ValueError:
        return None
    found = _periodic_lists(config, parts, None if shape_key is None else (shape_key, "parts"))
    if found is None:
        return None
    setup, head, first, steady, tail = found
    return setup, head + first + tail, head + steady + tail


def _shared_head(first: list[Event], steady: list[Event]) -> int:
    """How many events before the first of phase ``optimizer_step`` or ``zero_grad`` both steps hold, the
    same objects in the same places (0: they differ there)."""
    head = next((i for i, e in enumerate(first) if e.phase in OUTSIDE_BODY), len(first))
    return head if len(steady) >= head and all(map(operator.is_, first[:head], steady[:head])) else 0


def _shared_tail(first: list[Event], steady: list[Event], head: int) -> int:
    """How many events after the last of phase ``optimizer_step`` both steps hold, the same objects."""
    last = next((i for i in range(len(first) - 1, head - 1, -1) if first[i].phase == "optimizer_step"), head - 1)
    tail = len(first) - 1 - last
    if tail and (len(steady) - head < tail or not all(map(operator.is_, first[len(first) - tail:],
                                                          steady[len(steady) - tail:]))):
        return 0
    return tail


def layered_programs(config: Config, build: Callable[[Config], Sequence[list[Event]]],
                     finish: Callable[[list[Event]], list[Event]] | None = None,
                     shape_key: Hashable | None = None) -> tuple[Program, ...]:
    """``build(config)``'s event lists (any number, empty ones allowed) as programs, each list passed
    through ``finish``: compressed as :func:`layered_step` compresses a step, else one segment per list."""
    done = finish or (lambda events: events)
    programs = _periodic_lists(config, build, shape_key)
    if programs is None:
        return tuple((Segment(tuple(done(events))),) if events else () for events in build(config))
    return tuple(map_events(p, done) for p in programs)


def _periodic_lists(config: Config, build: Callable[[Config], Sequence[list[Event]]],
                    shape_key: Hashable | None, built: dict[int, Any] | None = None) -> tuple[Program, ...] | None:
    """The periodic programs of ``build``'s lists (None: too few layers, or not periodic). A list that is
    empty at every layer count built is an empty program; one empty at some counts only is not periodic.
    ``built``: filled with the canonical lists (and their signatures) of each layer count built, for a
    caller that reads more off them (``parallel/dropped.py``: the true names of repeated events)."""
    bases = _bases(config)
    if not bases:
        return None
    layers, period, highest = config.model.num_layers, _period(config), bases[-1]  # type: ignore[union-attr]
    built = {} if built is None else built  # the lists of each layer count, made once for every base tried
    filled: list[tuple[bool, ...]] = []

    def nonempty(n: int) -> list[list[Event]]:
        lists = list(build(with_layers(config, n)))
        pattern = tuple(bool(events) for events in lists)
        if filled and pattern != filled[0]:
            raise ValueError("a list is empty at some layer counts only")
        filled.append(pattern)
        return [events for events in lists if events]

    for base in bases:
        key = None if shape_key is None else (shape_key, base)
        if key in _NOT_FROM:  # this shape's pattern was not found from this base before: not again
            continue
        programs = periodic_programs(nonempty, layers, base=base, shape_key=key, period=period, built=built)
        if programs is not None:
            found = iter(programs)
            return tuple(next(found) if full else () for full in filled[0])
        if key is not None and base < highest:
            if len(_NOT_FROM) >= 1024:
                _NOT_FROM.clear()
            _NOT_FROM.add(key)
    return None


_NOT_FROM: set[Hashable] = set()


def _period(config: Config) -> int:
    """How many layers one repeated block spans (an MoE layer every k: k)."""
    return max(1, getattr(config.model, "moe_layer_step", 1) or 1)


def _bases(config: Config) -> list[int]:
    """The layer counts a periodic search starts from, in the order tried (none: too few layers to compress).

    A block that repeats may span several layers (an MoE layer every k), after some that do not (DeepSeek's
    dense first layers): the pattern is read where two whole periods follow those. The smallest base
    first (fewer layers to build); a pattern whose first or last layers differ from the others over more
    layers is found from the next one (periodic.BASE_LAYERS: what the search has always started from)."""
    layers = getattr(config.model, "num_layers", None)
    if not isinstance(layers, int) or layers <= COMPRESS_ABOVE_LAYERS:
        return []
    period = _period(config)
    dense = getattr(config.model, "first_dense_layers", 0) or 0
    lowest, highest = max(MIN_BASE_LAYERS, dense + 2 * period), max(BASE_LAYERS, dense + 2 * period)
    return list(dict.fromkeys(b + (layers - b) % period for b in range(lowest, highest + 1)))

#: the smallest layer count a pattern is read from (a first and a last layer; the next count adds one that
#: repeats): where the first or last layers differ from the rest, the search fails at once and the next is tried
MIN_BASE_LAYERS = 2


def compressed_step(programs: tuple[Program, ...],
                    build_events: Callable[[], tuple[list[Event], list[Event], list[Event]]],
                    exact: tuple[Program, ...] | None = None) -> CompressedStep:
    setup, first, steady = (summary_of(p) for p in programs)
    live_first = dict(setup.roles)
    live_steady = dict(_merge(setup.roles, first.roles))
    return CompressedStep(programs, peak_of(first, live_first), peak_of(steady, live_steady),
                          build_events, exact)  # type: ignore[arg-type]


def _delta_program(rounded: Program, exact: Program) -> Program:
    """Event by event, what the rounding added (the programs are the same events, sizes apart)."""
    return tuple(Segment(tuple(Event(r.name, r.role, r.nbytes - e.nbytes, r.phase)
                               for r, e in zip(rs.events, es.events, strict=True)), rs.count)
                 for rs, es in zip(rounded, exact, strict=True))


def _add_roles(totals: dict[str, int], program: Program, events: int | None) -> None:
    """Add per role the sizes of the first ``events`` events of ``program`` (all of them: None)."""
    left = program_length(program) if events is None else events
    for segment in program:
        if left <= 0:
            return
        if segment.length <= left:
            for role, n in segment.summary.roles:
                totals[role] = totals.get(role, 0) + n
            left -= segment.length
            continue
        copies, rest = divmod(left, len(segment.events))
        for e in segment.events:
            totals[e.role] = totals.get(e.role, 0) + e.nbytes * copies
        for e in segment.events[:rest]:
            totals[e.role] = totals.get(e.role, 0) + e.nbytes
        return


def _merge(a: tuple[tuple[str, int], ...], b: tuple[tuple[str, int], ...]) -> dict[str, int]:
    out = dict(a)
    for role, n in b:
        out[role] = out.get(role, 0) + n
    return out



def resolve_implementation(config: Config, device: str) -> str:
    """What torch.optim runs: 'auto' is for-loop on the CPU and foreach on CUDA (torch's default)."""
    impl = config.optimizer.implementation
    if impl == "auto":
        return "foreach" if device == "cuda" else "for-loop"
    return impl


def step_shape(config: Config) -> StepShape:
    return precision_shape(config.training.precision)


def precision_shape(precision: str) -> StepShape:
    """The step's dtypes under a ``training.precision`` (``precision.precision_plan``)."""
    plan = precision_plan(precision)
    return StepShape(
        activation_bytes=plan.activation_bytes,
        parameter_bytes=plan.parameter_bytes,
        gradient_bytes=plan.gradient_bytes,
        autocast=plan.autocast,
    )


def state_nbytes(spec: OptimizerSpec, param: ParamTensor, config: Config) -> list[tuple[str, int]]:
    """(name, bytes) of each state tensor of ``param``, in the order torch creates them."""
    default = training_plan(config.training).state_bytes
    return [
        (s.name, s.numel * (DTYPE_BYTES[s.dtype] if s.dtype else default))
        for s in spec.state_tensors(param, config.optimizer)
    ]


def simulate(config: Config, device: str = "cpu") -> SimulatedStep | CompressedStep:
    """Events of setup, the first step and a steady step; peaks of both steps.

    The same config simulated again (a fit's probes, its alternatives, every rank context) is answered
    from a small cache keyed by the config's JSON: the result is immutable.
    """
    key = (device, config.model_dump_json())
    if key not in _SIMULATED:
        if len(_SIMULATED) >= 64:
            _SIMULATED.pop(next(iter(_SIMULATED)))
        _SIMULATED[key] = _composed_step(config, device) or layered_step(
            config, lambda c: step_events(c, device, rounded=False), round_blocks if device == "cuda" else None,
            _shape_key(config, device), step_body_events)
    return _SIMULATED[key]


def _composed_step(config: Config, device: str) -> CompressedStep | None:
    """The step of a model whose layers repeat, composed from the periodic programs of its parts.

    A step is setup, then ``body + optimizer + tail`` twice (the first and a steady step), where the body
    (forward, loss, backward, every micro-batch) is the bulk of the events and depends on the model and
    training sections alone. Each part's program is found on its own (``periodic.py``: built at small layer
    counts, the repetition checked exactly), the body's once per (model, training) in a process, and the
    step's programs are their concatenations: a concatenation expands to the concatenation of the
    expansions, and ``Summary`` composes exactly, so the peaks are the flat step's. The body is searched
    once instead of inside both steps, and a config that differs only in the optimizer, the device or the
    layout reuses it. None when the model is small or a part is not periodic (the caller then searches the
    whole step, or builds it flat); ``tests/test_speed_simulate.py`` compares this with the flat step.
    """
    layers = getattr(config.model, "num_layers", None)
    if not isinstance(layers, int) or layers <= COMPRESS_ABOVE_LAYERS:
        return None
    body = body_program(config)
    if body is None:
        return None
    rest = _periodic_lists(config, lambda c: _rest_lists(c, device), (_shape_key(config, device), "rest"))
    if rest is None:
        return None
    setup, first_opt, steady_opt, tail = rest
    exact = (setup, body + first_opt + tail, body + steady_opt + tail)
    if device == "cuda":
        body_r, tail_r = rounded_program(body), map_events(tail, round_blocks)
        programs = (map_events(setup, round_blocks), body_r + map_events(first_opt, round_blocks) + tail_r,
                    body_r + map_events(steady_opt, round_blocks) + tail_r)
        step = compressed_step(programs, lambda: step_events(config, device), exact)
        return replace(step, build_body=lambda: round_blocks(step_body_events(config)))
    step = compressed_step(exact, lambda: step_events(config, device))
    return replace(step, build_body=lambda: step_body_events(config))


def body_program(config: Config) -> Program | None:
    """The periodic program of the forward-backward part of ``config``'s step (every micro-batch; the
    events before ``optimizer.step()``), unrounded, found once per (model, training) in a process; None
    when it is not periodic or the model has too few layers."""
    return model_body_program(config.model, config.training)


def model_body_program(model: Any, training: Any) -> Program | None:
    """:func:`body_program` of a model and training section (the optimizer, device and layout do not enter,
    nor ``training.master_weights``: the fp32 masters are made in setup and before ``optimizer.step()``, and no
    family reads the flag, so a fit's bf16 alternative with master weights reuses the plain bf16 body)."""
    data = training.model_dump(mode="json")
    data.pop("master_weights", None)
    key = (model.model_dump_json(), str(data))
    if key not in _BODY_PROGRAMS:
        if len(_BODY_PROGRAMS) >= 64:
            _BODY_PROGRAMS.pop(next(iter(_BODY_PROGRAMS)))
        config = Config.model_construct(model=model, training=training)
        family = get_family(model.family)
        data.pop("batch_size", None)
        shape_key = ("body", model.model_dump_json(), str(data))
        if training.grad_accum_steps > 1:
            _BODY_PROGRAMS[key] = _accumulated_program(config, family, shape_key)
        else:
            found = _periodic_lists(config, lambda c: [_body_part(c, family, step_shape(c))], shape_key)
            _BODY_PROGRAMS[key] = None if found is None else found[0]
    return _BODY_PROGRAMS[key]


def _accumulated_program(config: Config, family: Any, shape_key: Hashable) -> Program | None:
    """The program of several micro-batches' forward and backward (``accumulation.accumulated_body``): the first
    micro-batch's own program (one micro-batch's, found once and shared with the step without accumulation, which
    a fit's batch search has made already), its output and loss dropped, the later micro-batch's program (searched
    on its own) and that one's output and loss dropped (the family's end-of-step events, which do not repeat per
    layer: made at the model's size). A concatenation expands to the concatenation of the expansions, so the peaks
    are those of the whole list searched at once (``tests/test_composed_step.py``)."""
    first = model_body_program(config.model, config.training.model_copy(update={"grad_accum_steps": 1}))
    if first is None:
        return None
    later = _periodic_lists(config, lambda c: [later_named_apart(_body_events(family, c, step_shape(c)))],
                            (shape_key, "later micro-batch"))
    if later is None:
        return None
    dropped = after_backward(family.end_of_step_events(config.model, config.training, step_shape(config)))
    return (*first, *_one_segment(dropped), *later[0], *_one_segment(named_apart(dropped)))


def _one_segment(events: list[Event]) -> Program:
    return (Segment(tuple(events)),) if events else ()


def rounded_program(program: Program) -> Program:
    """``program`` with CUDA's 512-byte blocks, made once per program object (a body shared by configs)."""
    key = id(program)
    made = _ROUNDED.get(key)
    if made is None or made[0] is not program:
        if len(_ROUNDED) >= 64:
            _ROUNDED.pop(next(iter(_ROUNDED)))
        made = _ROUNDED[key] = (program, map_events(program, round_blocks))
    return made[1]


_BODY_PROGRAMS: dict[tuple[str, str], Program | None] = {}
_ROUNDED: dict[int, tuple[Program, Program]] = {}


def _rest_lists(config: Config, device: str) -> list[list[Event]]:
    """Setup, the first and the steady step's optimizer part (the fp32 master gradients, then
    ``optimizer.step()``) and the tail (``zero_grad`` and what follows), unrounded: :func:`step_events`
    less the body."""
    family = get_family(config.model.family)
    shape = step_shape(config)
    params = family.parameters(config.model)
    setup, first_opt, steady_opt = _setup_and_optimizer(config, device, family, params, shape)
    return [setup, first_opt, steady_opt, _tail_part(config, family, params, shape, separate_master_copy(config))]


_SIMULATED: dict[tuple[str, str], SimulatedStep | CompressedStep] = {}


def clear_caches() -> None:
    """Forget every step, forward-backward program and pattern this module and ``periodic.py`` keep (a
    benchmark timing a cold simulation clears them first)."""
    from estimator import periodic
    from estimator.families import memo

    for cache in (_SIMULATED, _BODIES, _MARKED, _BODY_PROGRAMS, _ROUNDED, _NOT_FROM, periodic._SHAPES):
        cache.clear()
    periodic._BLANKED.clear()
    memo.clear_caches()


def _shape_key(config: Config, device: str) -> str:
    """Everything the events' order depends on: the config less the batch size (which only scales sizes)."""
    data = config.model_dump(mode="json")
    data["training"].pop("batch_size", None)
    return f"{device}:{data}"


def step_events(
    config: Config, device: str = "cpu", rounded: bool = True
) -> tuple[list[Event], list[Event], list[Event]]:
    """The flat event lists of setup, the first step and a steady step (CUDA's blocks unless ``rounded=False``)."""
    family = get_family(config.model.family)
    shape = step_shape(config)
    params = family.parameters(config.model)
    setup, first_opt, steady_opt = _setup_and_optimizer(config, device, family, params, shape)
    body, tail = _body_and_tail(config, family, params, shape, separate_master_copy(config))
    first = body + first_opt + tail
    steady = body + steady_opt + tail
    if device == "cuda" and rounded:
        setup, first, steady = (round_blocks(e) for e in (setup, first, steady))
    return setup, first, steady


def _setup_and_optimizer(config: Config, device: str, family: Any, params: list[ParamTensor], shape: StepShape
                         ) -> tuple[list[Event], list[Event], list[Event]]:
    """Setup's events, and the first and a steady step's from the fp32 master gradients (made before
    ``optimizer.step()``) to the end of ``optimizer.step()``, unrounded."""
    spec = get_optimizer(config.optimizer.name)
    impl = resolve_implementation(config, device)
    # torch keeps the 'step' scalars on the CPU unless the kernel is fused (or capturable)
    step_bytes = STEP_TENSOR_BYTES if device == "cpu" or impl == "fused" else 0

    trainable = [p for p in params if p.trainable]
    master = separate_master_copy(config)  # bf16/fp16 + training.master_weights: fp32 masters (layouts.py)
    setup = [alloc(p.name, "parameter", p.numel * shape.parameter_bytes, "setup") for p in params]
    setup += family.input_events(config.model, config.training, shape)
    if master:
        setup += master_setup_events(trainable)
    if spec.state_init == "constructor":
        setup += state_events(spec, params, config, "setup", step_bytes)
    to_master = master_grad_events(trainable) if master else []
    first = to_master + optimizer_step_events(spec, trainable, config, impl, step_bytes, first=True)
    steady = to_master + optimizer_step_events(spec, trainable, config, impl, step_bytes, first=False)
    return setup, first, steady


def _body_and_tail(config: Config, family: Any, params: list[ParamTensor], shape: StepShape,
                   master: bool) -> tuple[list[Event], list[Event]]:
    """A step's events before ``optimizer.step()`` (forward, loss, backward, every micro-batch) and after
    it (``zero_grad``, the fp32 master gradients freed, what the training loop drops at the end)."""
    return _body_part(config, family, shape), _tail_part(config, family, params, shape, master)


def _body_part(config: Config, family: Any, shape: StepShape) -> list[Event]:
    """Forward, loss and backward of every micro-batch (each micro-batch but the last drops its output and
    loss after its backward: accumulation.py)."""
    body = _body_events(family, config, shape)
    steps = config.training.grad_accum_steps
    if steps > 1:
        return accumulated_body(body, family.end_of_step_events(config.model, config.training, shape), steps)
    return body


def _tail_part(config: Config, family: Any, params: list[ParamTensor], shape: StepShape, master: bool
               ) -> list[Event]:
    """``zero_grad``, the fp32 master gradients freed, and (one micro-batch) what the loop drops at the end."""
    tail = _zero_grad_events(params, shape) + (
        master_grad_free_events([p for p in params if p.trainable]) if master else [])
    if config.training.grad_accum_steps <= 1:
        tail += family.end_of_step_events(config.model, config.training, shape)
    return tail


OUTSIDE_BODY = ("optimizer_step", "zero_grad")


def step_body_events(config: Config) -> list[Event]:
    """A steady step's events outside ``optimizer.step()`` and ``zero_grad`` (phases :data:`OUTSIDE_BODY`),
    in order, unrounded, without building the optimizer's events: what a rank edits by name (ZeRO-2
    drops the gradients it does not own). Equal to filtering ``step_events(config)[2]``: everything
    ``optimizer.step()`` adds, and the fp32 master gradients made before it, are in the optimizer_step
    phase (``tests/test_speed_simulate.py``)."""
    family = get_family(config.model.family)
    body, tail = _body_and_tail(config, family, family.parameters(config.model), step_shape(config),
                                separate_master_copy(config))
    return [e for e in body + tail if e.phase not in OUTSIDE_BODY]


def step_tail_events(config: Config) -> list[Event]:
    """A step's ``zero_grad`` events (phase ``zero_grad``), in order, unrounded, without building the
    optimizer's events: the same in the first and a steady step, and on every device. Equal to filtering
    ``step_events(config)[1]`` or ``[2]`` by phase (``tests/test_speed_simulate.py``): only the tail after
    ``optimizer.step()`` has them, so the forward and backward are not built."""
    family = get_family(config.model.family)
    tail = _tail_part(config, family, family.parameters(config.model), step_shape(config),
                      separate_master_copy(config))
    return [e for e in tail if e.phase == "zero_grad"]


def unrounded_step(config: Config) -> SimulatedStep | CompressedStep:
    """The single-device step before CUDA's 512-byte rounding, for what a CUDA rank context composes.

    A compressed CUDA step keeps its unrounded programs (``exact_programs``): they are that step, made by
    the estimate already, so no second periodic search on the CPU is needed. They differ from the CPU
    step only in ``optimizer.step()``'s events (CUDA's foreach kernels, its 'step' scalars on the device),
    which a rank context replaces with its own (``parallel/base.py``). Otherwise (a flat step) the CPU
    step is simulated, as before.
    """
    cuda = simulate(config, "cuda")
    if not isinstance(cuda, CompressedStep) or cuda.exact_programs is None:
        return simulate(config, "cpu")
    key = ("cuda-exact", config.model_dump_json())
    if key not in _SIMULATED:
        _remember_step(key, replace(compressed_step(cuda.exact_programs,
                                                    lambda: step_events(config, "cuda", rounded=False)),
                                    build_body=lambda: step_body_events(config)))
    return _SIMULATED[key]


def _remember_step(key: tuple[str, str], step: SimulatedStep | CompressedStep) -> None:
    if len(_SIMULATED) >= 64:
        _SIMULATED.pop(next(iter(_SIMULATED)))
    _SIMULATED[key] = step


def _body_events(family: Any, config: Config, shape: StepShape) -> list[Event]:
    """The family's forward-backward events, made once per (model, training, shape) in a process.

    They depend on nothing else (not the device, the optimizer or the layout), so the probes and
    alternatives of a fit that keep the model and training sections (another optimizer, the CPU step a
    rank context reads) and the small layer counts a periodic search builds again reuse them. A copy
    of the list is returned (the events themselves are immutable).
    """
    if config.model.family in MARKED_FAMILIES:
        return marked_body(config)[0]
    key = (config.model.model_dump_json(), _micro_batch_key(config.training), shape)
    if key not in _BODIES:
        if len(_BODIES) >= 256:
            _BODIES.pop(next(iter(_BODIES)))
        _BODIES[key] = tuple(family.forward_backward_events(config.model, config.training, shape))
    return list(_BODIES[key])


_BODIES: dict[tuple[str, str, StepShape], tuple[Event, ...]] = {}


def _micro_batch_key(training: Any) -> str:
    """The training section as far as one micro-batch's forward and backward read it: not
    ``grad_accum_steps`` (``accumulation.py`` repeats the micro-batch's events) nor ``master_weights`` (the fp32
    masters are made in setup and before ``optimizer.step()``), so a fit's alternative of micro-batches of 1
    accumulated reuses the events its batch search built at batch 1."""
    data = training.model_dump(mode="json")
    data.pop("grad_accum_steps", None)
    data.pop("master_weights", None)
    return str(data)

#: families whose forward-backward events come from a simulator that also records FSDP2's hook marks
MARKED_FAMILIES = ("transformer", "moe")


def marked_body(config: Config) -> tuple[list[Event], list[tuple[int, str, str]]]:
    """The forward-backward events of a transformer or MoE config and where FSDP2's per-block hooks run
    among them, made once per (model, training, shape) in a process.

    The family's ``forward_backward_events`` is the same simulator's events (``transformer_events`` and
    ``moe_events``: ``step_events`` runs forward and backward and returns its events; the marks are
    what it records on the way), so the single-device step and every FSDP2 rank of the same model share
    one simulation per layer count instead of two (``tests/test_speed_simulate.py`` checks they are
    equal). Fresh lists are returned (the events themselves are immutable).
    """
    shape = step_shape(config)
    key = (config.model.model_dump_json(), _micro_batch_key(config.training), shape)
    if key not in _MARKED:
        if config.model.family == "transformer":
            from estimator.families.transformer_events import step_events_with_marks

            events, marks = step_events_with_marks(config.model, config.training, shape)
        else:
            from estimator.families.moe_events import _MoESim

            sim = _MoESim(config.model, config.training, shape)
            sim.forward()
            sim.backward()
            events, marks = sim.events(), sim.marks
        if len(_MARKED) >= 256:
            _MARKED.pop(next(iter(_MARKED)))
        _MARKED[key] = (tuple(events), tuple(marks))
    events, marks = _MARKED[key]
    return list(events), list(marks)


_MARKED: dict[tuple[str, str, StepShape], tuple[tuple[Event, ...], tuple[tuple[int, str, str], ...]]] = {}


def assemble_step(setup: list[Event], first: list[Event], steady: list[Event]) -> SimulatedStep:
    """Replay setup, then the first step, then a steady step on what the first left: one pass each."""
    live_first = replay(setup)
    first_peak, live_steady = scan(first, live_first)
    steady_peak, _ = scan(steady, live_steady)
    return SimulatedStep(setup, first, steady, first_peak, steady_peak, live_first, live_steady)


def round_size(n: int) -> int:
    """One allocation (``n`` > 0) or free (``n`` < 0) as CUDA's caching allocator counts it: its size rounded up
    to a whole number of 512-byte blocks, the sign kept (0 stays 0)."""
    sign = 1 if n > 0 else -1
    return sign * (-(-abs(n) // CUDA_BLOCK) * CUDA_BLOCK)


def round_blocks(events: list[Event]) -> list[Event]:
    """CUDA's caching allocator hands out multiples of 512 bytes (what max_memory_allocated counts)."""
    # an event already a whole number of blocks is kept as it is (events are immutable): most are
    return [e if not e.nbytes % CUDA_BLOCK else Event(e.name, e.role, round_size(e.nbytes), e.phase)
            for e in events]


def state_events(
    spec: OptimizerSpec, params: list[ParamTensor], config: Config, phase: str, step_bytes: int
) -> list[Event]:
    events: list[Event] = []
    for p in params:
        if not p.trainable:
            continue
        if spec.step_tensor and step_bytes:
            events.append(alloc(f"{p.name}.step", "optimizer_state", step_bytes, phase))
        for name, nbytes in state_nbytes(spec, p, config):
            events.append(alloc(f"{p.name}.{name}", "optimizer_state", nbytes, phase))
    return events


def optimizer_step_events(
    spec: OptimizerSpec,
    params: list[ParamTensor],
    config: Config,
    implementation: str,
    step_bytes: int,
    *,
    first: bool,
) -> list[Event]:
    """What ``optimizer.step()`` allocates and frees: state on the first step, temporaries always.

    for-loop: the optimizer's per-parameter script (``LoopOp``); foreach: the same kind of script
    over lists of all parameters; fused: one kernel, no temporaries.
    """
    phase = "optimizer_step"
    events: list[Event] = []
    if first and spec.state_init == "first_step":
        events += state_events(spec, params, config, phase, step_bytes)
    elem = training_plan(config.training).state_bytes
    inline_state = first and spec.state_init == "first_step_inline"
    if implementation == "fused":
        return events + (state_events(spec, params, config, phase, step_bytes) if inline_state else [])
    if implementation == "foreach":
        if spec.step_tensor and step_bytes:
            # torch._foreach_add_(steps, torch.tensor(1.0)): a scalar made and dropped at once
            events += [alloc("step_increment", "temporary", step_bytes, phase),
                       free("step_increment", "temporary", step_bytes, phase)]
        return events + _foreach_events(spec, params, config, elem, step_bytes, inline_state)
    return events + _for_loop_events(spec, params, config, elem, step_bytes, inline_state)


def _foreach_events(
    spec: OptimizerSpec, params: list[ParamTensor], config: Config, elem: int, step_bytes: int, inline_state: bool
) -> list[Event]:
    """The foreach script, each temporary a list over all parameters; what is left goes at return."""
    phase = "optimizer_step"
    events: list[Event] = []
    live: dict[str, list[Event]] = {}
    script = spec.foreach_script(config.optimizer)
    if inline_state and not any(op.action == "state" for op in script):
        events += state_events(spec, params, config, phase, step_bytes)
    for op in script:
        if op.action == "state":
            events += state_events(spec, params, config, phase, step_bytes) if inline_state else []
        elif op.action == "alloc":
            live[op.name] = [alloc(f"{p.name}.{op.name}", "temporary", p.numel * elem, phase) for p in params]
            events += live[op.name]
        else:
            events += [free(e.name, e.role, e.nbytes, phase) for e in reversed(live.pop(op.name))]
    for made in reversed(list(live.values())):
        events += [free(e.name, e.role, e.nbytes, phase) for e in reversed(made)]
    return events


def _for_loop_events(
    spec: OptimizerSpec, params: list[ParamTensor], config: Config, elem: int, step_bytes: int, inline_state: bool
) -> list[Event]:
    """The per-parameter script; a loop variable's tensor lives until the next iteration rebinds it."""
    phase = "optimizer_step"
    script = spec.loop_script(config.optimizer)
    has_state_op = any(op.action == "state" for op in script)
    events: list[Event] = []
    previous: dict[str, Event] = {}  # temporaries of the previous parameter still bound to a name
    for p in params:
        if inline_state and not has_state_op:
            events += state_events(spec, [p], config, phase, step_bytes)
        current: dict[str, Event] = {}
        for op in script:
            if op.action == "state":
                events += state_events(spec, [p], config, phase, step_bytes) if inline_state else []
            elif op.action == "alloc":
                current[op.name] = alloc(f"{p.name}.{op.name}", "temporary", p.numel * elem, phase)
                events.append(current[op.name])
            elif op.action == "free":
                done = current.pop(op.name)
                events.append(free(done.name, done.role, done.nbytes, phase))
            elif op.name in previous:
                done = previous.pop(op.name)
                events.append(free(done.name, done.role, done.nbytes, phase))
        previous.update(current)
    return events + [free(e.name, e.role, e.nbytes, phase) for e in previous.values()]


def _zero_grad_events(params: list[ParamTensor], shape: StepShape) -> list[Event]:
    """``zero_grad(set_to_none=True)`` drops every gradient, in parameter order."""
    return [
        free(f"{p.name}.grad", "gradient", p.numel * shape.gradient_bytes, "zero_grad")
        for p in params
        if p.trainable
    ]


def state_bytes(spec: OptimizerSpec, params: list[ParamTensor], config: Config, master_copy: bool | None = None) -> int:
    """Optimizer-state bytes of ``params``, one state layout per distinct shape (state depends on shape only).

    With ``training.master_weights`` the fp32 master copy counts as optimizer state (the ZeRO paper's
    K = 12 for Adam) unless ``master_copy`` is False (FSDP2's fp32 shards are the master copy).
    """
    master = master_weights(config) if master_copy is None else master_copy
    extra = master_copy_bytes(params) if master else 0
    counts: dict[tuple[tuple[int, ...], bool], int] = {}
    for p in params:
        key = (p.shape, p.trainable)
        counts[key] = counts.get(key, 0) + 1
    return extra + sum(n * sum(b for _, b in state_nbytes(spec, ParamTensor("p", shape, trainable), config))
                       for (shape, trainable), n in counts.items())
