"""Every collective a real rank calls, read off torch's flight recorder, as a :class:`CommVolume`.

torch (2.13) records each collective a process group runs, gloo included, into a ring buffer when
``TORCH_FR_BUFFER_SIZE`` is set before the group is made: its name, the shapes and dtypes of its input
and output tensors. It records in the process group itself, so it sees what Python hooks do not (DDP's
C++ reducer all-reduces its buckets and broadcasts its rebuilt bucket indices from C++) as well as
what FSDP2 (``all_gather_into_tensor``, ``reduce_scatter_tensor``) and ``ZeroRedundancyOptimizer``
(``broadcast``) call from Python. It keeps sizes, never tensors, so the memory measured in the same run
is untouched (the byte-exact memory tests pass with it on), and the engine runs as it would without it.
:meth:`CollectiveLog.take` returns what was recorded since the previous call: one call per step.

Each entry names its process group (``process_group``: the group's name and description). On a 2-D
``DeviceMesh`` the description is ``mesh_<dim>`` (``mesh_dp``, ``mesh_tp``); each call keeps that dim's name
and the group's size (looked up by the group's name in this process), so a 2-D rank's volume is split by
group (:class:`~estimator.parallel.comm.MeshVolume`). Calls in the default group, or in a group of every
rank (a 1-D mesh), are the 1-D :class:`~estimator.parallel.comm.CommVolume` they always were.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from estimator.errors import EstimatorError
from estimator.parallel.comm import CommVolume, KindVolume, MeshVolume, StepCommunication

#: entries the flight recorder keeps (a ring buffer): far more than a measured step calls
BUFFER_ENTRIES = 1 << 16
RECORDER_ENV = {"TORCH_FR_BUFFER_SIZE": str(BUFFER_ENTRIES)}

#: bytes per element of the dtype names the recorder writes (c10's ScalarType names)
DTYPE_BYTES = {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
               "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "Float8_e4m3fn": 1, "Float8_e5m2": 1}

#: the process group's op names (after the backend prefix) -> the kinds of estimator.parallel.comm
KIND_OF = {
    "all_reduce": "all_reduce", "allreduce": "all_reduce", "allreduce_coalesced": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "broadcast": "broadcast",
    "all_gather": "all_gather", "allgather": "all_gather", "_allgather_base": "all_gather",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather", "allgather_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "reduce": "reduce", "all_to_all": "all_to_all", "alltoall": "all_to_all", "alltoall_base": "all_to_all",
}


@dataclass(frozen=True)
class Collective:
    """One recorded call: its kind, the bytes of its input and output tensors on this rank, and its group
    (a mesh dimension's name and the group's size; ``""`` and 0 for the default group)."""

    kind: str
    input_bytes: int
    output_bytes: int
    group: str = ""
    group_size: int = 0


def _bytes(sizes: list[list[int]], dtypes: list[str]) -> int:
    total = 0
    for shape, dtype in zip(sizes, dtypes, strict=True):
        numel = 1
        for d in shape:
            numel *= d
        if dtype not in DTYPE_BYTES:
            raise EstimatorError(f"communication: the flight recorder wrote an unknown dtype {dtype!r}")
        total += numel * DTYPE_BYTES[dtype]
    return total


def group_of(entry: dict[str, Any]) -> tuple[str, str]:
    """(the group's name in this process, the mesh dimension it is) of a recorder entry; the dimension is ``""``
    unless the group's description is a ``DeviceMesh`` dimension's (``mesh_dp`` -> ``dp``)."""
    pg = entry.get("process_group") or ("", "")
    name, desc = str(pg[0]), str(pg[1]) if len(pg) > 1 else ""
    return name, desc[len("mesh_"):] if desc.startswith("mesh_") else ""


def collective_of(entry: dict[str, Any], group_size: int = 0) -> Collective | None:
    """A recorder entry as a collective, or None for what moves no data (barrier, p2p bookkeeping)."""
    name = str(entry.get("profiling_name", "")).split(":", 1)[-1]
    if name == "barrier" or entry.get("is_p2p"):
        return None
    if name not in KIND_OF:
        raise EstimatorError(f"communication: no kind for the collective {name!r}")
    dim = group_of(entry)[1]
    return Collective(KIND_OF[name], _bytes(entry["input_sizes"], entry["input_dtypes"]),
                      _bytes(entry["output_sizes"], entry["output_dtypes"]), dim, group_size if dim else 0)


def _gathered(c: Collective, world_size: int) -> Collective:
    """An all-gather's output is n times its input (n the group's size): torch 2.13's recorder writes the
    functional ``all_gather_into_tensor``'s input size as its output size too (TP's gathered logits: 6,144 B
    both, where the tracker sees the 12,288 B buffer at t = 2); FSDP2's and DDP's gathers are written right."""
    n = c.group_size or world_size
    if c.kind == "all_gather" and c.output_bytes < n * c.input_bytes:
        return Collective(c.kind, c.input_bytes, n * c.input_bytes, c.group, c.group_size)
    return c


def volume(collectives: Iterable[Collective], world_size: int) -> CommVolume | MeshVolume:
    """The collectives summed by kind; by group and kind when some ran in a group smaller than the world
    (a 2-D mesh's ``dp`` and ``tp`` groups)."""
    calls = [_gathered(c, world_size) for c in collectives]
    if not any(0 < c.group_size < world_size for c in calls):
        kinds: dict[str, KindVolume] = {}
        for c in calls:
            kinds[c.kind] = kinds.get(c.kind, KindVolume()) + KindVolume(1, c.input_bytes, c.output_bytes)
        return CommVolume.of(world_size, kinds)
    groups: dict[str, tuple[int, dict[str, KindVolume]]] = {}
    for c in calls:
        if not c.group:
            raise EstimatorError(f"communication: a {c.kind} in the default group of a rank on a 2-D mesh")
        size, kinds = groups.setdefault(c.group, (c.group_size, {}))
        kinds[c.kind] = kinds.get(c.kind, KindVolume()) + KindVolume(1, c.input_bytes, c.output_bytes)
    return MeshVolume.of(world_size, {g: CommVolume.of(size, kinds) for g, (size, kinds) in groups.items()})


class CollectiveLog:
    """The collectives this process has called, taken step by step from the flight recorder."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.last_record = -1
        self.sizes: dict[str, int] = {}

    def _size(self, entry: dict[str, Any]) -> int:
        """The size of the entry's process group (0 for the default group, which needs none)."""
        name, dim = group_of(entry)
        if not dim:
            return 0
        if name not in self.sizes:
            from torch.distributed.distributed_c10d import _get_group_size_by_name

            self.sizes[name] = int(_get_group_size_by_name(name))
        return self.sizes[name]

    def _entries(self) -> list[dict[str, Any]]:
        import torch

        raw = torch._C._distributed_c10d._dump_fr_trace_json(True, False)
        return list(json.loads(raw).get("entries", []))

    def take(self) -> list[Collective]:
        """What was called since the previous ``take`` (or since the process group was made), in order."""
        entries = sorted((e for e in self._entries() if e["record_id"] > self.last_record),
                         key=lambda e: e["record_id"])
        if entries and entries[0]["record_id"] != self.last_record + 1:
            raise EstimatorError(f"communication: the flight recorder dropped entries (more than {BUFFER_ENTRIES} "
                                 "collectives in one step)")
        if entries:
            self.last_record = entries[-1]["record_id"]
        return [c for c in (collective_of(e, self._size(e)) for e in entries) if c is not None]


def calls_to_json(calls: list[Collective]) -> list[list[Any]]:
    """The calls in order, each [kind, input bytes, output bytes] (what a rank's JSON keeps), followed by
    [group, group size] for a call in a mesh dimension's group."""
    return [[c.kind, c.input_bytes, c.output_bytes, *([c.group, c.group_size] if c.group else [])] for c in calls]


def volume_from_json(calls: list[list[Any]], world_size: int) -> CommVolume | MeshVolume:
    """The volume of calls kept by :func:`calls_to_json`."""
    return volume((Collective(str(c[0]), int(c[1]), int(c[2]), *((str(c[3]), int(c[4])) if len(c) > 3 else ()))
                   for c in calls), world_size)


def measured_communication(measurement: Any) -> StepCommunication | None:
    """A rank's recorded collectives (``RankMeasurement.communication``) as first, second and later steps."""
    calls = getattr(measurement, "communication", None) or {}
    if not all(k in calls for k in ("first_step", "second_step", "third_step")):
        return None
    n = int(measurement.world_size)
    return StepCommunication(volume_from_json(calls["first_step"], n), volume_from_json(calls["second_step"], n),
                             volume_from_json(calls["third_step"], n))
