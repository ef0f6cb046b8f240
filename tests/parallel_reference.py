"""The naive per-rank reference: every rank simulated flat, event by event (the code before rank grouping).

Kept in the tests to check ``estimator.parallel``, which computes distinct ranks once and composes
summaries, against a straightforward replay. Per-rank memory: DDP, ZeRO-1/2/3 (FSDP).

Model states, Rajbhandari et al. 2020 ("ZeRO", section 5; Ψ parameters, N ranks, K bytes of optimizer
state per parameter). Their mixed-precision numbers are (2+2+K)Ψ for DDP; here the bytes per parameter
come from our precision plan (parameters P_b, gradients G_b, state S_b per element):

* ddp:   P_b·Ψ + G_b·Ψ + S_b·Ψ                     (every rank holds everything)
* zero1: P_b·Ψ + G_b·Ψ + S_b·Ψ/N                   (optimizer state partitioned, P_os)
* zero2: P_b·Ψ + (G_b + S_b)·Ψ/N                   (+ gradients, P_os+g)
* zero3: (P_b + G_b + S_b)·Ψ/N                     (+ parameters, P_os+g+p)

"Ψ/N" is what torch really partitions: ZeroRedundancyOptimizer assigns whole tensors, largest first, to
the rank with the fewest elements so far (``_partition_parameters``); FSDP2 (Zhao et al. 2023, "PyTorch
FSDP"; ``fully_shard``) splits every tensor along dim 0 into ceil(rows/N)-row chunks, padded. FSDP
FULL_SHARD (FSDP2 ``reshard_after_forward=True``) ≈ zero3; SHARD_GRAD_OP (``False``) ≈ zero2.

Activations do not change: data parallelism splits the global batch, and ``training.batch_size`` in the
config is the batch of one rank (global batch = batch_size · N).

The peak is the timeline of ``simulate()`` with what torch adds on one rank (what the live-tensor
tracker showed on CPU/gloo, torch 2.13; docs/distributed.md):

* ddp / zero1: DDP's reducer allocates flat bucket buffers of all trainable gradients at construction
  (Li et al. 2020, "PyTorch Distributed", section 3.2.3; ``gradient_as_bucket_view=False``, the default,
  copies each gradient into its bucket), alive for the model's life: one extra gradient-sized set.
* zero1: each rank's optimizer state, and the optimizer's temporaries, only for its own partition.
* zero3 (mlp family): each unit (a layer; the root holds the head) is all-gathered before its forward
  and backward into a flat buffer, copied out into the unsharded parameter, resharded after; after its
  backward its gradient is copied into a flat reduce-scatter input, reduced into a shard-sized output
  that becomes the sharded ``.grad``. On gloo the reduce-scatter makes one more input-sized copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from estimator.config import Config
from estimator.errors import EstimatorError
from estimator.events import Event, alloc, free
from estimator.families.base import ParamTensor, get_family
from estimator.optimizers import get_optimizer
from estimator.precision import precision_plan
from estimator.simulate import (
    STEP_TENSOR_BYTES,
    SimulatedStep,
    optimizer_step_events,
    resolve_implementation,
    round_blocks,
    simulate,
    state_events,
    state_nbytes,
)
from estimator.timeline import find_peak, replay

Parallelism = Literal["ddp", "zero1", "zero2", "zero3"]
STRATEGIES: tuple[str, ...] = ("ddp", "zero1", "zero2", "zero3")
DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel(bucket_cap_mb=None) -> 25 MiB


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
    step: SimulatedStep

    @property
    def peak_bytes(self) -> int:
        return self.step.steady_peak.bytes

    @property
    def first_step_peak_bytes(self) -> int:
        return self.step.first_peak.bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "world_size": self.world_size, "rank": self.rank,
            "memory": {"parameters": self.parameters, "gradients": self.gradients,
                       "optimizer_state": self.optimizer_state, "optimizer_step_tensors": self.optimizer_step_tensors,
                       "activations": self.activations, "communication": self.communication},
            "peak_bytes": self.peak_bytes, "peak_phase": self.step.steady_peak.phase,
            "first_step_peak_bytes": self.first_step_peak_bytes, "first_step_peak_phase": self.step.first_peak.phase,
        }


def per_rank_estimate(
    config: Config, strategy: str, world_size: int, device: str = "cuda", rank: int = 0
) -> RankEstimate:
    """The memory of ``rank`` when the step runs data-parallel on ``world_size`` ranks with ``strategy``."""
    if strategy not in STRATEGIES:
        raise EstimatorError(f"--parallel: unknown strategy {strategy!r}; use {', '.join(STRATEGIES)}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise EstimatorError(f"--world-size: need world_size >= 1 and 0 <= rank < world_size, got {world_size}, {rank}")
    base = simulate(config, "cpu")  # unrounded; CUDA blocks are applied at the end
    family = get_family(config.model.family)
    params = family.parameters(config.model)
    trainable = [p for p in params if p.trainable]
    plan = precision_plan(config.training.precision)
    spec = get_optimizer(config.optimizer.name)
    impl = resolve_implementation(config, device)
    step_bytes = STEP_TENSOR_BYTES if device == "cpu" or impl == "fused" else 0
    activations = base.saved_activation_bytes

    if strategy == "zero3":
        if config.model.family != "mlp":
            raise EstimatorError("--parallel zero3: the per-unit FSDP timeline is modelled for the mlp family only")
        shards = [_shard(p, world_size, rank) for p in params]
        setup, first, steady = _zero3_events(config, params, world_size, rank, impl, step_bytes, device)
        local_state = [s.local for s, p in zip(shards, params, strict=True) if p.trainable]
        parameters = sum(s.padded.numel for s in shards) * plan.parameter_bytes
        gradients = plan.gradient_bytes * sum(s.padded.numel for s, p in zip(shards, params, strict=True)
                                              if p.trainable)
        comm = 0
    else:
        local_state = _zero_partition(trainable, world_size)[rank] if strategy in ("zero1", "zero2") else trainable
        buckets = [] if strategy == "zero2" else ddp_bucket_bytes(trainable, plan.gradient_bytes)
        comm = sum(buckets)
        setup = [e for e in base.setup if e.role != "optimizer_state"]
        setup += [alloc(f"ddp.bucket.{i}", "temporary", b, "setup") for i, b in enumerate(buckets)]
        if spec.state_init == "constructor":
            setup += state_events(spec, local_state, config, "setup", step_bytes)
        owned = {p.name for p in local_state}
        first = _replace_optimizer(base.first_step, spec, local_state, config, impl, step_bytes, True,
                                   None if strategy != "zero2" else owned)
        steady = _replace_optimizer(base.steady_step, spec, local_state, config, impl, step_bytes, False,
                                    None if strategy != "zero2" else owned)
        parameters = sum(p.numel for p in params) * plan.parameter_bytes
        grad_params = local_state if strategy == "zero2" else trainable
        gradients = sum(p.numel for p in grad_params) * plan.gradient_bytes

    state = sum(n for p in local_state for _, n in state_nbytes(spec, p, config))
    step_tensors = len(local_state) * step_bytes if spec.step_tensor else 0
    if device == "cuda":
        setup, first, steady = (round_blocks(e) for e in (setup, first, steady))
    live_first = replay(setup)
    live_steady = replay(first, live_first)
    step = SimulatedStep(setup, first, steady, find_peak(first, live_first), find_peak(steady, live_steady),
                         live_first, live_steady)
    return RankEstimate(strategy, world_size, rank, parameters, gradients, state, step_tensors, activations, comm, step)


def per_rank_estimates(config: Config, strategy: str, world_size: int, device: str = "cuda") -> list[RankEstimate]:
    """One :class:`RankEstimate` per rank (they differ when tensors do not split evenly)."""
    return [per_rank_estimate(config, strategy, world_size, device, rank) for rank in range(world_size)]


def model_state_bytes(config: Config, strategy: str, world_size: int) -> dict[str, float]:
    """The ZeRO paper's per-rank model states with an ideal Ψ/N split (section 5, Figure 1)."""
    plan = precision_plan(config.training.precision)
    spec = get_optimizer(config.optimizer.name)
    params = get_family(config.model.family).parameters(config.model)
    psi = sum(p.numel for p in params)
    k = sum(n for p in params if p.trainable for _, n in state_nbytes(spec, p, config)) / max(psi, 1)
    n = world_size
    p_b, g_b = plan.parameter_bytes, plan.gradient_bytes
    div = {"ddp": (1, 1, 1), "zero1": (1, 1, n), "zero2": (1, n, n), "zero3": (n, n, n)}[strategy]
    return {"parameters": p_b * psi / div[0], "gradients": g_b * psi / div[1], "optimizer_state": k * psi / div[2]}


# --------------------------------------------------------------------------- DDP and ZeRO-1/2
def ddp_bucket_bytes(params: list[ParamTensor], elem: int) -> list[int]:
    """Bytes of each DDP bucket: parameters in reverse order, a bucket closes once it reaches its cap.

    ``dist._compute_bucket_assignment_by_size`` with caps [1 MiB, 25 MiB] (the first bucket is small so
    the first all-reduce starts early; Li et al. 2020, section 3.2.3). One flat buffer per bucket.
    """
    buckets: list[int] = []
    current, caps = 0, [DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES]
    for p in reversed(params):
        current += p.numel * elem
        if current >= caps[min(len(buckets), 1)]:
            buckets.append(current)
            current = 0
    return buckets + ([current] if current else [])


def _zero_partition(params: list[ParamTensor], world_size: int) -> list[list[ParamTensor]]:
    """ZeroRedundancyOptimizer's split: largest first (stable), each to the rank with fewest elements."""
    ranks: list[list[ParamTensor]] = [[] for _ in range(world_size)]
    sizes = [0] * world_size
    for p in sorted(params, key=lambda t: t.numel, reverse=True):
        r = sizes.index(min(sizes))
        ranks[r].append(p)
        sizes[r] += p.numel
    return ranks


def _replace_optimizer(
    events: list[Event], spec: Any, local: list[ParamTensor], config: Config, impl: str, step_bytes: int,
    first: bool, owned: set[str] | None,
) -> list[Event]:
    """The step with ``optimizer.step()`` on this rank's partition; zero2 drops gradients it does not own."""
    body = [e for e in events if e.phase not in ("optimizer_step", "zero_grad")]
    tail = [e for e in events if e.phase == "zero_grad"]
    if owned is not None:  # zero2 (estimate only): a gradient not owned is reduced to its owner and dropped
        dropped = {e.name for e in body if e.role == "gradient" and e.nbytes > 0
                   and e.name.removesuffix(".grad") not in owned}
        out: list[Event] = []
        for e in body:
            out.append(e)
            if e.name in dropped and e.nbytes > 0:
                out.append(free(e.name, e.role, e.nbytes, e.phase))
        body, tail = out, [e for e in tail if e.name not in dropped]
    return body + optimizer_step_events(spec, local, config, impl, step_bytes, first=first) + tail


# --------------------------------------------------------------------------- ZeRO-3 / FSDP2
@dataclass(frozen=True)
class _Shard:
    padded: ParamTensor  # ceil(rows/N) rows: the local storage FSDP2 allocates (and the all-gather chunk)
    local: ParamTensor  # the rows this rank really owns (what zeros_like(param) makes for optimizer state)


def _shard(p: ParamTensor, world_size: int, rank: int) -> _Shard:
    """FSDP2's Shard(0): torch.chunk's ceil(rows/N) rows per rank, the storage padded to that size."""
    rows, rest = p.shape[0], p.shape[1:]
    chunk = -(-rows // world_size)
    mine = max(0, min(chunk, rows - rank * chunk))
    return _Shard(ParamTensor(p.name, (chunk, *rest), p.trainable), ParamTensor(p.name, (mine, *rest), p.trainable))


def _zero3_events(
    config: Config, params: list[ParamTensor], world_size: int, rank: int, impl: str, step_bytes: int, device: str
) -> tuple[list[Event], list[Event], list[Event]]:
    """FSDP2 on the Cruncher: ``fully_shard`` on each layer, then on the root (which holds the head).

    Order read off torch 2.13 (``_fsdp_param_group.py``, ``_fsdp_collectives.py``) and the tracker: a
    unit's all-gather output lives until the next unit's copy-out; the root is not resharded after
    forward; backward prefetches the next unit; a reduce-scatter input lives until the next one is
    made; post-backward of units whose input needs no gradient (layer 0, the root) runs in the final
    callback, root first.
    """
    family = get_family("mlp")
    plan = precision_plan(config.training.precision)
    p_b, g_b = plan.parameter_bytes, plan.gradient_bytes
    spec = get_optimizer(config.optimizer.name)
    n = config.model.num_layers
    by_name = {p.name: p for p in params}
    unit_param = {f"U{i}": f"layers.{i}.weight" for i in range(n)} | {"R": "final.weight"}
    shard = {u: _shard(by_name[name], world_size, rank) for u, name in unit_param.items()}
    full = {u: by_name[name].numel for u, name in unit_param.items()}
    padded = {u: s.padded.numel * world_size for u, s in shard.items()}
    gloo_copy = device == "cpu"  # ProcessGroupGloo's reduce_scatter copies its input; NCCL does not

    def unshard_alloc(u: str, phase: str) -> list[Event]:
        return [alloc(f"{u}.all_gather", "temporary", padded[u] * p_b, phase)]

    def copy_out(u: str, phase: str) -> list[Event]:  # the all-gather output per parameter is padded
        return [alloc(f"{u}.unsharded", "parameter", padded[u] * p_b, phase)]

    def reshard(u: str, phase: str) -> list[Event]:
        return [free(f"{u}.unsharded", "parameter", padded[u] * p_b, phase)]

    def drop_ag(u: str, phase: str) -> list[Event]:
        return [free(f"{u}.all_gather", "temporary", padded[u] * p_b, phase)]

    rs_live: list[str] = []

    def post_backward(u: str) -> list[Event]:
        ph, name = "backward", unit_param[u]
        ev = reshard(u, ph)
        if rs_live:
            prev = rs_live.pop()
            ev.append(free(f"{prev}.rs_input", "temporary", padded[prev] * g_b, ph))
        ev.append(alloc(f"{u}.rs_input", "temporary", padded[u] * g_b, ph))
        ev.append(alloc(f"{name}.grad.shard", "gradient", shard[u].padded.numel * g_b, ph))
        if gloo_copy:
            ev += [alloc(f"{u}.gloo_copy", "temporary", padded[u] * g_b, ph),
                   free(f"{u}.gloo_copy", "temporary", padded[u] * g_b, ph)]
        ev.append(free(f"{name}.grad", "gradient", full[u] * g_b, ph))
        rs_live.append(u)
        return ev

    shape_events = family.forward_backward_events(config.model, config.training, _shape(config))
    body: list[Event] = unshard_alloc("R", "forward") + copy_out("R", "forward")
    prev_ag = "R"
    for e in shape_events:
        if e.phase == "forward" and e.nbytes > 0 and e.name.startswith("h"):
            i = int(e.name[1:]) - 1
            u = f"U{i}"
            body += unshard_alloc(u, "forward") + copy_out(u, "forward") + drop_ag(prev_ag, "forward")
            body.append(e)
            body += reshard(u, "forward")
            prev_ag = u
            continue
        if e.phase == "backward" and e.nbytes > 0 and e.name.startswith("layers.") and e.name.endswith(".grad"):
            i = int(e.name.split(".")[1])
            u = f"U{i}"
            body += copy_out(u, "backward") + drop_ag(u, "backward")
            if i > 0:
                body += unshard_alloc(f"U{i - 1}", "backward")
        if e.phase == "backward" and e.name == "grad_loss" and e.nbytes < 0:
            body += post_backward("R") + post_backward("U0")
            last = rs_live.pop()
            body.append(free(f"{last}.rs_input", "temporary", padded[last] * g_b, "backward"))
        body.append(e)
        if e.phase == "forward" and e.name == "out":
            body += drop_ag(prev_ag, "forward")
        elif e.phase == "backward" and e.name == "grad_out" and e.nbytes > 0:
            body += unshard_alloc(f"U{n - 1}", "backward")  # the root's pre-backward prefetches the last layer
        elif e.phase == "backward" and e.nbytes < 0 and e.name.startswith("h") and e.name != f"h{n}":
            body += post_backward(f"U{int(e.name[1:])}")  # layer i's saved input h{i} freed: its backward is done
    local = [s.local for s, p in zip((shard[u] for u in unit_param), (by_name[v] for v in unit_param.values()),
                                     strict=True) if p.trainable]
    order = {p.name: k for k, p in enumerate(params)}
    local.sort(key=lambda p: order[p.name])
    tail = [free(f"{p.name}.grad.shard", "gradient", shard[u].padded.numel * g_b, "zero_grad")
            for u, name in sorted(unit_param.items(), key=lambda kv: order[kv[1]]) for p in [by_name[name]]
            if p.trainable]
    tail += family.end_of_step_events(config.model, config.training, _shape(config))
    setup = [alloc(p.name, "parameter", _shard(p, world_size, rank).padded.numel * p_b, "setup") for p in params]
    if device == "cpu":  # DeviceMesh keeps torch.arange(N, dtype=int32) as its rank map, always on the CPU
        setup.append(alloc("device_mesh.rank_map", "temporary", 4 * world_size, "setup"))
    setup += family.input_events(config.model, config.training, _shape(config))
    if spec.state_init == "constructor":
        setup += state_events(spec, local, config, "setup", step_bytes)
    first = body + optimizer_step_events(spec, local, config, impl, step_bytes, first=True) + tail
    steady = body + optimizer_step_events(spec, local, config, impl, step_bytes, first=False) + tail
    return setup, first, steady


def _shape(config: Config) -> Any:
    from estimator.simulate import step_shape

    return step_shape(config)

