"""Communication volume of one rank in one training step: the collectives it calls, what it hands them,
and the bytes a ring algorithm puts on its links.

Two figures per collective kind, per rank, per step:

* **logical** (exact, what ``verify --parallel`` measures): ``calls``, ``input_bytes`` and
  ``output_bytes``, the bytes of the tensors handed to the collective and filled by it, as a
  process-group hook or torch's flight recorder sees them. The collective's size S is the larger of
  the two: the buffer of an all-reduce or a broadcast, the gathered output of an all-gather, the full
  input of a reduce-scatter.
* **wire** (a model): the bytes each rank sends, and receives, under NCCL's ring algorithms, which
  are bandwidth-optimal (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters
  of workstations", JPDC 69(2)): all-reduce 2(N-1)/N·S, all-gather and reduce-scatter (N-1)/N·S,
  broadcast and reduce S. These are the factors NCCL's performance notes use for "bus bandwidth"
  (nccl-tests ``doc/PERFORMANCE.md``). A ring sends as much as it receives; the root of a broadcast
  receives nothing and the last rank of its chain sends nothing, which the figure (the busiest rank's)
  leaves out. Summed exactly over the calls (a rational), rounded to whole bytes once.

The dtypes of what crosses come from one place, :func:`collective_dtypes`, and what gradient
accumulation repeats from another, :func:`accumulation`: a strategy only says which collectives one
micro-batch, one gradient synchronisation and one optimizer step make (:class:`CommParts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from estimator.config import Config

#: the kinds in the order they are shown
KINDS: tuple[str, ...] = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all")

CONVENTION = ("per rank per step; logical: calls and the bytes of the tensors handed to (input) and filled by "
              "(output) each collective; wire: bytes sent and received per rank by NCCL's ring algorithms "
              "(all-reduce 2(N-1)/N·S, all-gather and reduce-scatter (N-1)/N·S, broadcast and reduce S; "
              "Patarasuk & Yuan 2009; nccl-tests doc/PERFORMANCE.md)")


def ring_factor(kind: str, world_size: int) -> Fraction:
    """Bytes on one rank's link per byte of the collective's size S (NCCL's bus-bandwidth factors)."""
    n = world_size
    if kind == "all_reduce":
        return Fraction(2 * (n - 1), n)
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return Fraction(n - 1, n)
    if kind in ("broadcast", "reduce"):
        return Fraction(1 if n > 1 else 0)
    raise ValueError(f"unknown collective kind {kind!r}")


@dataclass(frozen=True)
class KindVolume:
    """One collective kind's calls and bytes on one rank."""

    calls: int = 0
    input_bytes: int = 0
    output_bytes: int = 0

    @property
    def size_bytes(self) -> int:
        """S summed over the calls: the buffer (all-reduce, broadcast), the gathered output, the full input."""
        return max(self.input_bytes, self.output_bytes)

    def __add__(self, other: KindVolume) -> KindVolume:
        return KindVolume(self.calls + other.calls, self.input_bytes + other.input_bytes,
                          self.output_bytes + other.output_bytes)

    def times(self, k: int) -> KindVolume:
        return KindVolume(self.calls * k, self.input_bytes * k, self.output_bytes * k)


@dataclass(frozen=True)
class CommVolume:
    """Every collective one rank calls in one step (or one part of it), by kind."""

    world_size: int
    kinds: tuple[tuple[str, KindVolume], ...] = ()

    @classmethod
    def of(cls, world_size: int, volumes: dict[str, KindVolume]) -> CommVolume:
        for kind in volumes:
            ring_factor(kind, 2)  # an unknown kind is a bug
        order = {k: i for i, k in enumerate(KINDS)}
        return cls(world_size, tuple(sorted(((k, v) for k, v in volumes.items() if v.calls),
                                            key=lambda kv: order[kv[0]])))

    def get(self, kind: str) -> KindVolume:
        return dict(self.kinds).get(kind, KindVolume())

    def __add__(self, other: CommVolume) -> CommVolume:
        merged = dict(self.kinds)
        for kind, v in other.kinds:
            merged[kind] = merged.get(kind, KindVolume()) + v
        return CommVolume.of(self.world_size, merged)

    def times(self, k: int) -> CommVolume:
        return CommVolume.of(self.world_size, {kind: v.times(k) for kind, v in self.kinds})

    @property
    def calls(self) -> int:
        return sum(v.calls for _, v in self.kinds)

    @property
    def size_bytes(self) -> int:
        """The logical bytes of every collective (each one's S)."""
        return sum(v.size_bytes for _, v in self.kinds)

    def wire_bytes(self, kind: str | None = None) -> int:
        """Bytes this rank sends (and receives) on the ring, for one kind or all, rounded once."""
        chosen = self.kinds if kind is None else [(kind, self.get(kind))]
        return round(sum((ring_factor(k, self.world_size) * v.size_bytes for k, v in chosen), Fraction(0)))

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls, "size_bytes": self.size_bytes, "wire_bytes": self.wire_bytes(),
            "by_kind": {k: {"calls": v.calls, "input_bytes": v.input_bytes, "output_bytes": v.output_bytes,
                            "size_bytes": v.size_bytes, "wire_bytes": self.wire_bytes(k)} for k, v in self.kinds},
        }

    def logical(self) -> dict[str, tuple[int, int, int]]:
        """Kind -> (calls, input bytes, output bytes): what a measurement is compared with, exactly."""
        return {k: (v.calls, v.input_bytes, v.output_bytes) for k, v in self.kinds}

    def rows(self) -> list[tuple[str, KindVolume, int]]:
        """(kind, calls and bytes, wire bytes) per kind, for a table."""
        return [(k, v, self.wire_bytes(k)) for k, v in self.kinds]


@dataclass(frozen=True)
class GroupVolume:
    """One process group's collectives on a rank: the group's name (``dp``, ``tp``), its size and its volume."""

    name: str
    volume: CommVolume

    @property
    def size(self) -> int:
        return self.volume.world_size


@dataclass(frozen=True)
class MeshVolume:
    """A rank's collectives on a 2-D mesh, one :class:`CommVolume` per process group it belongs to.

    On a ``(dp, tp)`` mesh a rank calls FSDP2's all-gathers and reduce-scatters in its ``dp`` group (N/t ranks)
    and TP's all-reduces, all-gathers and reduce-scatters in its ``tp`` group (t ranks). Each group's calls
    and bytes are its own; its wire bytes use its own size in the ring factors (:func:`ring_factor`). The
    figures summed over the groups (``calls``, ``size_bytes``, ``wire_bytes``, ``kinds``) are what a 1-D
    :class:`CommVolume` reports, so a reader of the totals needs nothing else.
    """

    world_size: int
    groups: tuple[GroupVolume, ...] = ()

    @classmethod
    def of(cls, world_size: int, groups: dict[str, CommVolume]) -> MeshVolume:
        return cls(world_size, tuple(GroupVolume(n, v) for n, v in sorted(groups.items()) if v.calls))

    def group(self, name: str) -> CommVolume | None:
        return next((g.volume for g in self.groups if g.name == name), None)

    @property
    def kinds(self) -> tuple[tuple[str, KindVolume], ...]:
        """Every kind summed over the groups."""
        total: dict[str, KindVolume] = {}
        for g in self.groups:
            for kind, v in g.volume.kinds:
                total[kind] = total.get(kind, KindVolume()) + v
        return CommVolume.of(self.world_size, total).kinds

    def get(self, kind: str) -> KindVolume:
        return dict(self.kinds).get(kind, KindVolume())

    def __add__(self, other: MeshVolume) -> MeshVolume:
        merged = {g.name: g.volume for g in self.groups}
        for g in other.groups:
            merged[g.name] = merged[g.name] + g.volume if g.name in merged else g.volume
        return MeshVolume.of(self.world_size, merged)

    def times(self, k: int) -> MeshVolume:
        return MeshVolume.of(self.world_size, {g.name: g.volume.times(k) for g in self.groups})

    @property
    def calls(self) -> int:
        return sum(g.volume.calls for g in self.groups)

    @property
    def size_bytes(self) -> int:
        return sum(g.volume.size_bytes for g in self.groups)

    def wire_bytes(self, kind: str | None = None) -> int:
        """Each group's ring bytes at its own size, summed (each group rounded once)."""
        return sum(g.volume.wire_bytes(kind) for g in self.groups)

    def to_json(self) -> dict[str, Any]:
        total = {k: {"calls": v.calls, "input_bytes": v.input_bytes, "output_bytes": v.output_bytes,
                     "size_bytes": v.size_bytes, "wire_bytes": self.wire_bytes(k)} for k, v in self.kinds}
        return {"calls": self.calls, "size_bytes": self.size_bytes, "wire_bytes": self.wire_bytes(), "by_kind": total,
                "by_group": {g.name: {"group_size": g.size, **g.volume.to_json()} for g in self.groups}}

    def logical(self) -> dict[str, tuple[int, int, int]]:
        """``group:kind`` -> (calls, input bytes, output bytes), what a measurement is compared with."""
        return {f"{g.name}:{k}": v for g in self.groups for k, v in g.volume.logical().items()}

    def rows(self) -> list[tuple[str, KindVolume, int]]:
        """(label, calls and bytes, wire bytes) per group and kind, for a table."""
        return [(f"{k} ({g.name}, {g.size} ranks)", v, g.volume.wire_bytes(k)) for g in self.groups
                for k, v in g.volume.kinds]


@dataclass(frozen=True)
class CommParts:
    """What a strategy's collectives are made of, before accumulation repeats them.

    ``micro_batch``: every forward/backward (FSDP2's all-gathers); ``gradient_sync``: each time gradients
    are synchronised (DDP's all-reduce, FSDP2's reduce-scatter); ``optimizer_step``: once per step
    (ZeRO's parameter broadcasts); ``second_forward``: once, in the run's second forward (DDP rebuilding
    its buckets): the second step's, or the first step's second micro-batch under accumulation.
    """

    micro_batch: CommVolume | MeshVolume
    gradient_sync: CommVolume | MeshVolume
    optimizer_step: CommVolume | MeshVolume
    second_forward: CommVolume | MeshVolume


@dataclass(frozen=True)
class StepCommunication:
    """One rank's collectives in the first, the second and every later step."""

    first_step: CommVolume | MeshVolume
    second_step: CommVolume | MeshVolume
    steady_step: CommVolume | MeshVolume

    def to_json(self) -> dict[str, Any]:
        groups = getattr(self.steady_step, "groups", None)
        return {"convention": CONVENTION, "world_size": self.steady_step.world_size,
                **({"groups": {g.name: g.size for g in groups}} if groups is not None else {}),
                "first_step": self.first_step.to_json(), "second_step": self.second_step.to_json(),
                "steady_step": self.steady_step.to_json()}


@dataclass(frozen=True)
class CollectiveDtypes:
    """Bytes per element of what crosses: parameters (gathered, broadcast) and gradients (reduced)."""

    parameter_bytes: int
    gradient_bytes: int


def collective_dtypes(config: Config, strategy: str | None = None) -> CollectiveDtypes:
    """The one place the dtypes of the collectives are decided.

    The tensors cross in the dtype they have: the parameters' (``model.to(dtype)``, or fp32 under
    autocast, which casts only inside the forward) for all-gathers and broadcasts, the gradients'
    (AccumulateGrad keeps the parameter's dtype) for all-reduces and reduce-scatters. With 16-bit weights
    and an fp32 master copy (``training.master_weights``) the model's parameters and gradients are 16-bit
    under DDP and ZeRO-1/2; under zero3/fsdp it is FSDP2's ``MixedPrecisionPolicy``: the fp32 shard is cast
    to ``param_dtype`` (16-bit) before the all-gather and gradients are reduce-scattered in
    ``reduce_dtype`` (``parallel.reduce_dtype``: fp32, or the 16-bit param dtype) (torch 2.13
    ``_fsdp_collectives.py``; Zhao et al. 2023, section 4.4).
    """
    from estimator.precision import precision_plan

    plan = precision_plan(config.training.precision)
    gradient = plan.gradient_bytes
    master = bool(getattr(config.training, "master_weights", False))
    if master and strategy in ("zero3", "fsdp") and getattr(config.parallel, "reduce_dtype", "fp32") == "fp32":
        gradient = 4
    return CollectiveDtypes(plan.parameter_bytes, gradient)


def accumulation(config: Config) -> tuple[int, bool]:
    """(micro-batches per optimizer step, whether gradients are synchronised after every one of them).

    ``training.grad_accum_steps`` micro-batches; each synchronises its gradients, as the harness runs them
    (DDP without ``no_sync``, FSDP2 reduce-scattering after every backward: estimator/accumulation.py). A
    switch that syncs only the last micro-batch (``no_sync`` / ``set_requires_gradient_sync(False)``) would
    be read here, as ``parallel.sync_every_micro_batch``.
    """
    steps = int(getattr(config.training, "grad_accum_steps", 1) or 1)
    sync_every = bool(getattr(config.parallel, "sync_every_micro_batch", True))
    return steps, sync_every


def step_communication(config: Config, parts: CommParts) -> StepCommunication:
    """Repeat a strategy's parts over the micro-batches of one step (:func:`accumulation`)."""
    steps, sync_every = accumulation(config)
    steady = (parts.micro_batch.times(steps) + parts.gradient_sync.times(steps if sync_every else 1)
              + parts.optimizer_step)
    if steps > 1:  # the run's second forward is the first step's second micro-batch
        return StepCommunication(steady + parts.second_forward, steady, steady)
    return StepCommunication(steady, steady + parts.second_forward, steady)


def empty(world_size: int) -> CommVolume:
    return CommVolume(world_size)
