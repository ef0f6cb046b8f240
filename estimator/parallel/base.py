"""What every parallel strategy shares: the per-rank result, the rank groups, and the step they compose.

A strategy (one module each: ``ddp.py``, ``zero.py``, ``fsdp.py``) says which ranks are distinct and
how one rank's step differs from the single-device step: which model states it holds, which buffers
appear and when. It composes the shared single-device step (as :class:`~estimator.periodic.Segment`
programs, summarised once) with the few events that are its own, so the cost of ``N`` ranks is the
cost of the distinct ranks, and that of a distinct rank is the number of events that differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Protocol

from estimator.config import Config
from estimator.errors import EstimatorError
from estimator.events import Event
from estimator.families.base import ParamTensor, get_family
from estimator.optimizers import OptimizerSpec, get_optimizer
from estimator.parallel.comm import CommParts, StepCommunication, step_communication
from estimator.periodic import Program, keep_events, map_events
from estimator.precision import PrecisionPlan, training_plan
from estimator.simulate import (
    STEP_TENSOR_BYTES,
    CompressedStep,
    SimulatedStep,
    resolve_implementation,
    round_blocks,
    simulate,
    step_tail_events,
    unrounded_step,
)
from estimator.timeline import Peak, Summary, peak_of

#: the largest world size an estimate accepts (a bound, not a cost: distinct ranks are computed once)
MAX_WORLD_SIZE = 1 << 20


@dataclass(frozen=True)
class RankStep:
    """One rank's step as the peaks the report needs (the events are composed, never materialised)."""

    first_peak: Peak
    steady_peak: Peak
    saved_activation_bytes: int


@dataclass(frozen=True)
class RankEstimate:
    """Bytes on one rank: model states, activations, communication buffers and the step's peaks."""

    strategy: str
    world_size: int
    rank: int
    parameters: int
    gradients: int
    optimizer_state: int
    optimizer_step_tensors: int
    activations: int  # saved for backward, same as one device (batch_size is per rank)
    communication: int  # persistent buffers: DDP buckets (transient all-gather/reduce-scatter are in the peak)
    step: RankStep
    communication_volume: StepCommunication | None = None  # the collectives per step (comm.py)
    host: dict[str, int] | None = None  # bytes kept in host memory (FSDP2 CPU offload), by role

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values()) if self.host else 0

    @property
    def peak_bytes(self) -> int:
        return self.step.steady_peak.bytes

    @property
    def first_step_peak_bytes(self) -> int:
        return self.step.first_peak.bytes

    def figures(self) -> tuple[Any, ...]:
        """Everything the report shows of a rank: ranks with equal figures are shown as one row."""
        return (self.parameters, self.gradients, self.optimizer_state, self.optimizer_step_tensors,
                self.activations, self.communication, self.peak_bytes, self.first_step_peak_bytes,
                self.step.steady_peak.phase, self.step.first_peak.phase, self.communication_volume,
                self.host_bytes)

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "world_size": self.world_size, "rank": self.rank,
            "memory": {"parameters": self.parameters, "gradients": self.gradients,
                       "optimizer_state": self.optimizer_state, "optimizer_step_tensors": self.optimizer_step_tensors,
                       "activations": self.activations, "communication": self.communication},
            "peak_bytes": self.peak_bytes, "peak_phase": self.step.steady_peak.phase,
            "first_step_peak_bytes": self.first_step_peak_bytes, "first_step_peak_phase": self.step.first_peak.phase,
            **({"communication_volume": self.communication_volume.to_json()} if self.communication_volume else {}),
            **({"host_memory": {**self.host, "total": self.host_bytes}} if self.host else {}),
        }


@dataclass(frozen=True)
class RankGroup:
    """Ranks whose figures are all equal, computed once: ``ranks`` as inclusive ranges."""

    ranks: tuple[tuple[int, int], ...]
    estimate: RankEstimate

    @property
    def count(self) -> int:
        return sum(b - a + 1 for a, b in self.ranks)

    def __getattr__(self, name: str) -> Any:
        """A group reads like the rank it stands for (strategy, peak_bytes, ...)."""
        if name.startswith("__") or name == "estimate":
            raise AttributeError(name)
        return getattr(self.estimate, name)

    def label(self) -> str:
        return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ranks)

    def to_json(self) -> dict[str, Any]:
        return {"ranks": [list(r) for r in self.ranks], "count": self.count, **self.estimate.to_json()}


@dataclass
class RankContext:
    """The shared single-device step and everything a strategy needs to rewrite it for one rank."""

    config: Config
    world_size: int
    device: str
    params: list[ParamTensor] = field(init=False)
    trainable: list[ParamTensor] = field(init=False)
    spec: OptimizerSpec = field(init=False)
    plan: PrecisionPlan = field(init=False)
    impl: str = field(init=False)
    step_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.params = get_family(self.config.model.family).parameters(self.config.model)
        self.trainable = [p for p in self.params if p.trainable]
        self.spec = get_optimizer(self.config.optimizer.name)
        self.plan = training_plan(self.config.training)
        self.impl = resolve_implementation(self.config, self.device)
        # torch keeps the 'step' scalars on the CPU unless the kernel is fused (or capturable)
        self.step_bytes = STEP_TENSOR_BYTES if self.device == "cpu" or self.impl == "fused" else 0
        self._shared: dict[str, Any] = {}

    @cached_property
    def base(self) -> SimulatedStep | CompressedStep:
        """The single-device step, unrounded (CUDA's blocks are applied to what is composed from it): on
        CUDA the estimate's own unrounded programs (``simulate.unrounded_step``), else the CPU step."""
        return unrounded_step(self.config) if self.device == "cuda" else simulate(self.config, "cpu")

    @cached_property
    def setup(self) -> Program:
        return self.rounded(self.base.programs[0])

    @cached_property
    def first_body(self) -> Program:
        return self._split(self.base.programs[1])[0]

    @cached_property
    def first_tail(self) -> Program:
        return self._split(self.base.programs[1])[1]

    @cached_property
    def steady_body(self) -> Program:
        return self._split(self.base.programs[2])[0]

    @cached_property
    def steady_tail(self) -> Program:
        return self._split(self.base.programs[2])[1]

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """What every rank of this context shares, made once (e.g. the summaries of the common body)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def rounded(self, program: Program) -> Program:
        return map_events(program, round_blocks) if self.device == "cuda" else program

    def round(self, events: list[Event]) -> list[Event]:
        return round_blocks(events) if self.device == "cuda" else events

    def _split(self, program: Program) -> tuple[Program, Program]:
        """Forward, loss and backward (shared by every rank) and the zero_grad tail, without the optimizer."""
        body = keep_events(program, lambda e: e.phase not in ("optimizer_step", "zero_grad"))
        tail = keep_events(program, _shared_tail_event)
        return self.rounded(body), self.rounded(tail)

    def flat_body(self) -> list[Event]:
        """The forward/backward events as one flat list (materialised: for strategies that edit them by name;
        a compressed step builds them without the optimizer's events, ``simulate.step_body_events``)."""
        return self.round(self.base.body_events())

    def flat_tail(self) -> list[Event]:
        """The zero_grad events as one flat list (materialised, named), built without the rest of the step
        (``simulate.step_tail_events``: the same in the first and a steady step)."""
        return self.round([e for e in step_tail_events(self.config) if _shared_tail_event(e)])


def _shared_tail_event(e: Event) -> bool:
    """zero_grad's frees that every rank shares: not the fp32 master gradients (each rank frees its own)."""
    return e.phase == "zero_grad" and not e.name.endswith(".master.grad")


class Strategy(Protocol):
    name: str

    def groups(self, ctx: RankContext) -> list[tuple[tuple[tuple[int, int], ...], int]]:
        """Distinct ranks: (the ranks as inclusive ranges, the rank to compute for them)."""
        ...

    def estimate(self, ctx: RankContext, rank: int) -> RankEstimate: ...

    def communication(self, ctx: RankContext, rank: int) -> CommParts:
        """The collectives one micro-batch, one gradient sync and one optimizer step of ``rank`` call."""
        ...


def with_communication(strategy: Strategy, ctx: RankContext, rank: int, estimate: RankEstimate) -> RankEstimate:
    """``estimate`` with its communication per step (a strategy without ``communication`` leaves it None)."""
    parts = getattr(strategy, "communication", None)
    if parts is None:
        return estimate
    return replace(estimate, communication_volume=step_communication(ctx.config, parts(ctx, rank)))


STRATEGIES_BY_NAME: dict[str, Strategy] = {}


def register_strategy(cls: type) -> type:
    """Class decorator: one instance per strategy name; a duplicate name is a bug."""
    instance = cls()
    if instance.name in STRATEGIES_BY_NAME:
        raise ValueError(f"strategy {instance.name!r} registered twice")
    STRATEGIES_BY_NAME[instance.name] = instance
    return cls


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES_BY_NAME:
        raise EstimatorError(f"--parallel: unknown strategy {name!r}; use {', '.join(STRATEGIES_BY_NAME)}")
    return STRATEGIES_BY_NAME[name]


def check_world_size(world_size: int, rank: int = 0) -> None:
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise EstimatorError(f"--world-size: expected 1 <= N <= {MAX_WORLD_SIZE:,}, got {world_size}")
    if not 0 <= rank < world_size:
        raise EstimatorError(f"--world-size: need 0 <= rank < world_size, got rank {rank} of {world_size}")


def compose(ctx: RankContext, setup_events: Sequence[Event], setup_program: Program,
            first: Sequence[Summary], steady: Sequence[Summary]) -> RankStep:
    """A rank's step from its setup and the summaries of its first and steady steps, in order."""
    live = dict(ctx.shared(f"setup_roles{id(setup_program)}", lambda: _role_totals(setup_program, ())))
    for e in setup_events:
        live[e.role] = live.get(e.role, 0) + e.nbytes
    first_sum, steady_sum = chain(first), chain(steady)
    live_steady = dict(live)
    for role, n in first_sum.roles:
        live_steady[role] = live_steady.get(role, 0) + n
    saved = ctx.shared("saved_activation_bytes", lambda: ctx.base.saved_activation_bytes)
    return RankStep(peak_of(first_sum, live), peak_of(steady_sum, live_steady), saved)


def summaries(program: Program) -> list[Summary]:
    return [segment.summary for segment in program]



def chain(parts: Sequence[Summary]) -> Summary:
    """The summaries one after another."""
    total = Summary()
    for part in parts:
        total = total.then(part)
    return total


def _role_totals(program: Program, extra: Sequence[Event]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for segment in program:
        for role, n in segment.summary.roles:
            totals[role] = totals.get(role, 0) + n  # each segment summarised once, whatever the ranks
    for e in extra:
        totals[e.role] = totals.get(e.role, 0) + e.nbytes
    return totals



def merge_equal(groups: list[tuple[tuple[tuple[int, int], ...], RankEstimate]]) -> list[RankGroup]:
    """Groups whose figures are equal become one (their ranges joined, adjacent ranges fused)."""
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for ranges, est in groups:
        slot = merged.setdefault(est.figures(), [[], est])
        slot[0].extend(ranges)
    out = []
    for ranges, est in merged.values():
        fused: list[list[int]] = []
        for a, b in sorted(ranges):
            if fused and fused[-1][1] + 1 >= a:
                fused[-1][1] = max(fused[-1][1], b)
            else:
                fused.append([a, b])
        out.append(RankGroup(tuple((a, b) for a, b in fused), est))
    return sorted(out, key=lambda g: g.ranks[0][0])


def local_model_states(ctx: RankContext, local_state: list[ParamTensor], master_copy: bool | None = None
                       ) -> tuple[int, int]:
    """Optimizer-state bytes and 'step' scalar bytes of a rank that steps ``local_state``.

    ``master_copy``: whether an fp32 master copy of ``local_state`` is optimizer state (None: as
    ``training.master_weights`` says; FSDP2 passes False, its fp32 shards being the master copy).
    """
    from estimator.simulate import state_bytes

    step_tensors = len(local_state) * ctx.step_bytes if ctx.spec.step_tensor else 0
    return state_bytes(ctx.spec, local_state, ctx.config, master_copy), step_tensors
