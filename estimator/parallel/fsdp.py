"""ZeRO-3 as torch runs it: FSDP2 ``fully_shard`` (Zhao et al. 2023, "PyTorch FSDP"; ZeRO's P_os+g+p,
Rajbhandari et al. 2020, section 5: (P_b + G_b + S_b)·Ψ/N per rank).

FSDP2's Shard(0) splits every tensor along dim 0 into ceil(rows/N)-row chunks (``torch.chunk``), the
local storage padded to that size, so ranks differ only where a tensor's rows run out: ranks are
grouped by which chunks they hold, and each group is computed once.

mlp family: each unit (a layer; the root holds the head) is all-gathered before its forward and
backward into a flat buffer, copied out into the unsharded parameter, resharded after; after its
backward its gradient is copied into a flat reduce-scatter input, reduced into a shard-sized output
that becomes the sharded ``.grad``. On gloo the reduce-scatter makes one more input-sized copy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import prod
from typing import Any, NamedTuple

from estimator.accumulation import after_backward, later_micro_batch_at
from estimator.config import Config
from estimator.errors import EstimatorError
from estimator.events import Event, alloc, free
from estimator.families.base import ParamTensor, get_family
from estimator.layouts import master_weights
from estimator.optimizers import get_optimizer
from estimator.parallel.base import (
    RankContext,
    RankEstimate,
    RankStep,
    local_model_states,
    register_strategy,
)
from estimator.parallel.comm import CommParts, CommVolume, KindVolume, collective_dtypes, empty
from estimator.precision import precision_plan
from estimator.simulate import (
    _shape_key,
    layered_step,
    marked_body,
    optimizer_step_events,
    state_events,
    step_shape,
)


class Shard(NamedTuple):
    """One rank's part of a tensor (a named tuple: a rank of a 61-layer MoE shards some 15,000 tensors)."""

    padded: ParamTensor  # ceil(rows/N) rows: the local storage FSDP2 allocates (and the all-gather chunk)
    local: ParamTensor  # the rows this rank really owns (what zeros_like(param) makes for optimizer state)


def shard(p: ParamTensor, world_size: int, rank: int) -> Shard:
    """FSDP2's Shard(0): torch.chunk's ceil(rows/N) rows per rank, the storage padded to that size."""
    return Shard(ParamTensor(p.name, padded_shape(p.shape, world_size), p.trainable),
                 ParamTensor(p.name, local_shape(p.shape, world_size, rank), p.trainable))


def padded_shape(shape: tuple[int, ...], world_size: int) -> tuple[int, ...]:
    """A ``shape`` tensor's padded Shard(0) storage on every rank: ceil(rows/N) rows (``shard``'s ``padded``)."""
    return (-(-shape[0] // world_size), *shape[1:])


def local_shape(shape: tuple[int, ...], world_size: int, rank: int) -> tuple[int, ...]:
    """The rows of a ``shape`` tensor that ``rank`` owns under Shard(0) (``shard``'s ``local``)."""
    chunk = -(-shape[0] // world_size)
    return (max(0, min(chunk, shape[0] - rank * chunk)), *shape[1:])


def shard_groups(params: list[ParamTensor], world_size: int) -> list[tuple[tuple[tuple[int, int], ...], int]]:
    """Ranks that hold the same rows of every tensor, as inclusive ranges (one representative each).

    For a tensor of R rows and chunk c = ceil(R/N), ranks below R // c hold c rows, rank R // c holds
    R mod c, the rest none: the breakpoints of all tensors cut [0, N) into the distinct groups.
    """
    cuts = {0, world_size}
    for p in params:
        rows = p.shape[0]
        chunk = -(-rows // world_size)
        for b in (rows // chunk, rows // chunk + 1):
            if 0 < b < world_size:
                cuts.add(b)
    edges = sorted(cuts)
    return [(((a, b - 1),), a) for a, b in zip(edges, edges[1:], strict=False)]


@dataclass(frozen=True)
class ShardDtypes:
    """Bytes per element of what FSDP2 keeps and moves, under its MixedPrecisionPolicy or without one.

    Without master weights every role takes the model's dtype. With ``training.master_weights`` the
    policy is ``MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=parallel.reduce_dtype)``: fp32
    shards (parameters, their gradients, optimizer state), a 16-bit cast of the shard for the all-gather
    (``_get_param_all_gather_inputs``), 16-bit unsharded parameters and gradients, the reduce-scatter in
    ``reduce_dtype`` and its output cast to fp32 when that differs (``foreach_reduce``).
    """

    shard: int  # sharded parameters and the sharded gradients the optimizer reads
    gather: int  # the all-gather buffers and unsharded parameters (param_dtype)
    grad: int  # unsharded gradients (computed in param_dtype)
    reduce: int  # the reduce-scatter input and output (reduce_dtype)
    cast_for_gather: bool  # the shard is cast to param_dtype before the all-gather

    @staticmethod
    def of(ctx: RankContext) -> ShardDtypes:
        p_b, g_b = ctx.plan.parameter_bytes, ctx.plan.gradient_bytes
        if not master_weights(ctx.config):
            return ShardDtypes(p_b, p_b, g_b, g_b, False)
        reduce = 4 if ctx.config.parallel.reduce_dtype == "fp32" else g_b
        return ShardDtypes(4, p_b, g_b, reduce, True)


@register_strategy
class Zero3:
    """FSDP2 with its default, ``reshard_after_forward=True`` (ZeRO-3)."""

    name = "zero3"

    def reshards(self, config: Config) -> bool:
        return True

    def groups(self, ctx: RankContext) -> list[tuple[tuple[tuple[int, int], ...], int]]:
        return shard_groups(ctx.params, ctx.world_size)

    def communication(self, ctx: RankContext, rank: int) -> CommParts:
        reshards = self.reshards(ctx.config)
        return ctx.shared(f"fsdp_communication_{reshards}", lambda: fsdp_communication(ctx, self.name, reshards))

    def estimate(self, ctx: RankContext, rank: int) -> RankEstimate:
        config, world_size = ctx.config, ctx.world_size
        if config.model.family == "mlp" and config.training.precision.startswith("amp"):
            raise EstimatorError("training.precision: the mlp family's FSDP2 timeline is modelled for fp32, bf16 "
                                 f"and fp16, not {config.training.precision} (autocast's casts are not placed among "
                                 "its hooks); the transformer and moe families model it")
        if config.model.family == "mlp" and config.parallel.offload:
            raise EstimatorError("parallel.offload: FSDP2's CPU offload is modelled for the transformer and moe "
                                 "families, not the mlp family")
        if config.model.family == "mlp" and config.training.grad_accum_steps > 1:
            raise EstimatorError("training.grad_accum_steps: under zero3/fsdp gradient accumulation is modelled for "
                                 "the transformer and moe families, not the mlp family")
        if config.model.family == "mlp" and master_weights(config):
            raise EstimatorError("training.master_weights: FSDP2's MixedPrecisionPolicy is modelled for the "
                                 "transformer and moe families under zero3/fsdp, not the mlp family")
        if config.model.family == "mlp" and not self.reshards(config):
            raise EstimatorError("parallel.reshard_after_forward: false is modelled for the transformer and moe "
                                 "families; the mlp family's FSDP2 timeline reshards after forward (zero3)")
        if config.model.family not in TRACED_FAMILIES and config.parallel.fsdp_unit_class is not None:
            raise EstimatorError(f"parallel.fsdp_unit_class: chooses the units of a model.module; the "
                                 f"{config.model.family} family's units are fixed (docs/distributed.md)")
        if config.model.family not in ("mlp", *MARKED_FAMILIES):
            raise EstimatorError(f"--parallel zero3: the per-unit FSDP2 timeline is modelled for the mlp, "
                                 f"{', '.join(MARKED_FAMILIES)} families, not {config.model.family!r}")
        reshards = self.reshards(config)

        def build(cfg: Config) -> tuple[list[Event], list[Event], list[Event]]:
            small = RankContext(cfg, world_size, ctx.device)  # cheap: the single-device step is not built
            if cfg.model.family == "mlp":
                return _zero3_events(cfg, small.params, world_size, rank, small.impl, small.step_bytes, ctx.device)
            return unit_events(small, rank, reshard_after_forward=reshards)

        # a rank's FSDP2 step repeats per block like the model's: costed once per distinct block (periodic.py)
        # the events' order and names do not depend on the world size or the rank (sizes do): one key for all
        key = (_shape_key(config, ctx.device), "fsdp", reshards)
        step = _split_step(ctx, rank, reshards) or layered_step(config, build, ctx.round if ctx.device == "cuda"
                                                                else None, key)
        parameters, gradients, state, step_tensors = rank_model_states(ctx, rank)
        saved = ctx.shared("saved_activation_bytes", lambda: ctx.base.saved_activation_bytes)
        if config.parallel.offload:  # CPUOffloadPolicy: the model states live in (pinned) host memory
            host = {"parameters": parameters, "gradients": gradients, "optimizer_state": state,
                    "optimizer_step_tensors": step_tensors}
            return RankEstimate(self.name, world_size, rank, 0, 0, 0, 0, saved, 0,
                                RankStep(step.first_peak, step.steady_peak, saved), host=host)
        return RankEstimate(self.name, world_size, rank, parameters, gradients, state, step_tensors, saved, 0,
                            RankStep(step.first_peak, step.steady_peak, saved))


def sharded_model_states(ctx: RankContext, shards: list[Shard]) -> tuple[int, int, int, int]:
    """A rank's sharded parameters, sharded gradients, optimizer state and 'step' scalars, in bytes.

    FSDP2 (Zhao et al. 2023, section 3.2; torch's ``fully_shard``): the padded Shard(0) storage of every
    parameter and of every trainable parameter's gradient, and optimizer state for the rows the rank
    owns (``zeros_like`` of the unpadded local tensor), one shard at a time: the reference
    :func:`rank_model_states` (what ranks and the fit read) is checked against (``tests/test_fsdp_own.py``).
    """
    params = ctx.params
    dtypes = ShardDtypes.of(ctx)
    local_state = [s.local for s, p in zip(shards, params, strict=True) if p.trainable]
    parameters = sum(s.padded.numel for s in shards) * dtypes.shard
    gradients = dtypes.shard * sum(s.padded.numel for s, p in zip(shards, params, strict=True) if p.trainable)
    state, step_tensors = local_model_states(ctx, local_state, master_copy=False)
    return parameters, gradients, state, step_tensors


def rank_model_states(ctx: RankContext, rank: int) -> tuple[int, int, int, int]:
    """:func:`sharded_model_states` of ``rank``'s shards, from how many parameters have each shape: a shard's
    size depends on its tensor's shape only, and the state on the local shape only (``simulate.state_bytes``),
    so the rank costs O(distinct shapes) instead of a shard made per parameter (some 1,300 for DeepSeek-V3)."""
    counts = ctx.shared("fsdp_shape_counts", lambda: Counter((p.shape, p.trainable) for p in ctx.params))
    dtypes = ShardDtypes.of(ctx)
    padded = {shape: prod(padded_shape(shape, ctx.world_size)) for shape, _ in counts}
    parameters = dtypes.shard * sum(n * padded[shape] for (shape, _), n in counts.items())
    gradients = dtypes.shard * sum(n * padded[shape] for (shape, trainable), n in counts.items() if trainable)
    state = step_tensors = 0
    for (shape, trainable), n in counts.items():
        if trainable:  # both sums are per tensor, its name unused (state_bytes counts shapes): n times one
            one = local_model_states(ctx, [ParamTensor("p", local_shape(shape, ctx.world_size, rank), True)],
                                     master_copy=False)
            state, step_tensors = state + n * one[0], step_tensors + n * one[1]
    return parameters, gradients, state, step_tensors


def _split_step(ctx: RankContext, rank: int, reshards: bool) -> RankStep | None:
    """The rank's peaks from the part every rank shares and its own optimizer events (``fsdp_split.py``);
    None where that split does not apply (then the rank's whole step is simulated)."""
    from estimator.parallel.fsdp_split import SPLIT_FAMILIES, split_rank_step

    if ctx.config.model.family not in SPLIT_FAMILIES:
        return None
    return split_rank_step(ctx, rank, reshards)


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
    shards_of = {u: shard(by_name[name], world_size, rank) for u, name in unit_param.items()}
    full = {u: by_name[name].numel for u, name in unit_param.items()}
    padded = {u: s.padded.numel * world_size for u, s in shards_of.items()}
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
        ev.append(alloc(f"{name}.grad.shard", "gradient", shards_of[u].padded.numel * g_b, ph))
        if gloo_copy:
            ev += [alloc(f"{u}.gloo_copy", "temporary", padded[u] * g_b, ph),
                   free(f"{u}.gloo_copy", "temporary", padded[u] * g_b, ph)]
        ev.append(free(f"{name}.grad", "gradient", full[u] * g_b, ph))
        rs_live.append(u)
        return ev

    shape_events = family.forward_backward_events(config.model, config.training, step_shape(config))
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
    local = [s.local for s, p in zip((shards_of[u] for u in unit_param), (by_name[v] for v in unit_param.values()),
                                     strict=True) if p.trainable]
    order = {p.name: k for k, p in enumerate(params)}
    local.sort(key=lambda p: order[p.name])
    tail = [free(f"{p.name}.grad.shard", "gradient", shards_of[u].padded.numel * g_b, "zero_grad")
            for u, name in sorted(unit_param.items(), key=lambda kv: order[kv[1]]) for p in [by_name[name]]
            if p.trainable]
    tail += family.end_of_step_events(config.model, config.training, step_shape(config))
    setup = [alloc(p.name, "parameter", shard(p, world_size, rank).padded.numel * p_b, "setup") for p in params]
    if device == "cpu":  # DeviceMesh keeps torch.arange(N, dtype=int32) as its rank map, always on the CPU
        setup.append(alloc("device_mesh.rank_map", "temporary", 4 * world_size, "setup"))
    setup += family.input_events(config.model, config.training, step_shape(config))
    if spec.state_init == "constructor":
        setup += state_events(spec, local, config, "setup", step_bytes)
    first = body + optimizer_step_events(spec, local, config, impl, step_bytes, first=True) + tail
    steady = body + optimizer_step_events(spec, local, config, impl, step_bytes, first=False) + tail
    return setup, first, steady


@register_strategy
class FSDP(Zero3):
    """FSDP2 as ``parallel.reshard_after_forward`` says (False: ZeRO-2-like, gathered from forward to backward)."""

    name = "fsdp"

    def reshards(self, config: Config) -> bool:
        return config.parallel.reshard_after_forward


# --------------------------------------------------------------------------- any family that marks its hooks
def _transformer_marks(config: Config) -> tuple[list[Event], list[tuple[int, str, str]]]:
    """The family's events and hook marks, shared with the single-device step (``simulate.marked_body``)."""
    return marked_body(config)


_MARKED: dict[str, Any] = {}


def _memo(config: Config, make: Any) -> Any:
    """The family's marked events for a config, made once (every rank and world size shares them)."""
    key = config.model_dump_json()
    if key not in _MARKED:
        if len(_MARKED) >= 64:
            _MARKED.pop(next(iter(_MARKED)))
        _MARKED[key] = make()
    return _MARKED[key]


def _moe_marks(config: Config) -> tuple[list[Event], list[tuple[int, str, str]]]:
    """The family's events and hook marks, shared with the single-device step (``simulate.marked_body``)."""
    return marked_body(config)


def unit_classes(config: Config) -> tuple[str, ...] | None:
    """``parallel.fsdp_unit_class`` as a tuple of class names (None: the default choice, module_trace.py)."""
    given = config.parallel.fsdp_unit_class
    return None if given is None else ((given,) if isinstance(given, str) else tuple(given))


#: families whose step is a traced nn.Module: their FSDP2 units are chosen on the module (module_trace.py)
TRACED_FAMILIES = ("module", "hf")


def _module_trace(config: Config) -> Any:
    """A traced module's step with FSDP2's hooks (families/module.py), at the precision it runs in; a
    transformers model (the hf family) is traced as the module it builds (families/hf.py)."""
    from estimator.families.module import trace_module_fsdp

    model = config.model
    if model.family == "hf":
        from estimator.families.hf import module_config

        model = module_config(model, config.training)
    return trace_module_fsdp(model, config.training.precision, unit_classes(config), master_weights(config))


def _module_marks(config: Config) -> tuple[list[Event], list[tuple[int, str, str]]]:
    """A traced module: the step events and where FSDP2's hooks ran, both read off one hooked trace."""
    trace = _module_trace(config)
    return list(trace.step_events), list(trace.fsdp_marks)


def _end_events(config: Config) -> list[Event]:
    """The hooked trace's end of step (its storages' names are that trace's)."""
    return list(_module_trace(config).end_events)


#: families whose event simulation says where FSDP2's hooks run (pre/post forward and backward of each block)
MARKED_FAMILIES: dict[str, Any] = {"transformer": _transformer_marks, "moe": _moe_marks, "module": _module_marks,
                                   "hf": _module_marks}
UNIT_PREFIX = "blocks."


def unit_of(name: str) -> str:
    """``fully_shard`` on each ``blocks.i`` and then on the root: a parameter's unit."""
    if name.startswith(UNIT_PREFIX):
        return ".".join(name.split(".")[:2])
    return "root"


def module_units_json(config: Config, strategy: str | None) -> dict[str, Any] | None:
    """A traced module's FSDP2 units as chosen (the class names, how, the submodule paths in order)."""
    if config.model.family not in TRACED_FAMILIES or strategy not in ("zero3", "fsdp"):
        return None
    trace = _module_trace(config)
    units = list(dict.fromkeys(u for _, u in trace.fsdp_units if u != "root"))
    how = "parallel.fsdp_unit_class" if config.parallel.fsdp_unit_class is not None else "default"
    return {"classes": list(trace.fsdp_classes), "chosen_by": how, "units": units}


def module_units_line(config: Config, strategy: str | None) -> str | None:
    """One line naming the units ``fully_shard`` wraps before the root (None unless a module under FSDP2)."""
    found = module_units_json(config, strategy)
    if found is None:
        return None
    if not found["units"]:
        return ("FSDP2 units: fully_shard on the root only (no submodule class holding parameters repeats; "
                "parallel.fsdp_unit_class names one)")
    units, how = found["units"], found["chosen_by"]
    span = ", ".join(units) if len(units) <= 3 else f"{units[0]}, {units[1]}, ..., {units[-1]}"
    why = "parallel.fsdp_unit_class" if how != "default" else "the most repeated class; parallel.fsdp_unit_class " \
        "chooses another"
    return f"FSDP2 units: fully_shard on {len(units)} x {', '.join(found['classes'])} ({span}), then the root ({why})"


def units_of(config: Config, params: list[ParamTensor]) -> dict[str, str]:
    """Each parameter's ``fully_shard`` unit: ``blocks.i`` / ``root``, or for a traced module the path of the
    chosen submodule that holds it (``parallel.fsdp_unit_class``, module_trace.fsdp_unit_modules)."""
    if config.model.family in TRACED_FAMILIES:
        return dict(_module_trace(config).fsdp_units)
    return {p.name: unit_of(p.name) for p in params}


def unit_events(ctx: RankContext, rank: int, reshard_after_forward: bool = True,
                marked: tuple[list[Event], list[tuple[int, str, str]]] | None = None,
                ) -> tuple[list[Event], list[Event], list[Event]]:
    """One rank's step under FSDP2 (setup, first step, steady step): :func:`unit_parts` with the optimizer's
    events for the rows the rank owns, its constructor state at the end of setup and ``optimizer.step()``
    between the forward/backward and the zero_grad tail (none on the device under CPU offload)."""
    setup, out, tail, local_params = unit_parts(ctx, rank, reshard_after_forward, marked)
    if ctx.config.parallel.offload:  # the optimizer steps the host's shards on the CPU: nothing of it on the device
        return setup, out + tail, out + tail
    config = ctx.config
    if ctx.spec.state_init == "constructor":
        setup += state_events(ctx.spec, local_params, config, "setup", ctx.step_bytes)
    first = out + optimizer_step_events(ctx.spec, local_params, config, ctx.impl, ctx.step_bytes, first=True) + tail
    steady = out + optimizer_step_events(ctx.spec, local_params, config, ctx.impl, ctx.step_bytes, first=False) + tail
    return setup, first, steady


def unit_parts(ctx: RankContext, rank: int, reshard_after_forward: bool = True,
               marked: tuple[list[Event], list[tuple[int, str, str]]] | None = None,
               ) -> tuple[list[Event], list[Event], list[Event], list[ParamTensor]]:
    """One rank's step under FSDP2 less its optimizer's events, from the family's events and where its hooks
    run: setup (before any optimizer state), the forward/backward with FSDP2's hooks (the same in the first
    and a steady step), the zero_grad tail, and the rank's trainable shards (what its optimizer steps).

    What each hook does, read off torch 2.13 (``_fsdp_param_group.py``, ``_fsdp_state.py``,
    ``_fsdp_collectives.py``): pre-forward all-gathers the unit into one flat buffer and copies it out
    into one storage per parameter, keeping the buffer until the next unit's copy-out (the root's
    post-forward drops the last); post-forward reshards (frees the unsharded parameters) unless it is
    the root or ``reshard_after_forward`` is off; pre-backward unshards again (buffer freed right after
    the copy-out) and prefetches the previous unit; post-backward reshards, drops the previous
    reduce-scatter input, copies the unit's gradients into a flat reduce-scatter input, reduces into
    one flat shard that becomes every parameter's ``.grad`` (on gloo the reduce-scatter copies its
    input once more), then releases the full gradients. The root's post-backward runs in the final
    callback, then the last reduce-scatter input goes.
    """
    config, n, family = ctx.config, ctx.world_size, get_family(ctx.config.model.family)
    shape = step_shape(config)
    dt = ShardDtypes.of(ctx)
    p_b, g_b, r_b = dt.gather, dt.grad, dt.reduce
    offload = config.parallel.offload  # FSDP2's CPUOffloadPolicy: shards, their gradients and the optimizer on the host
    # ``marked``: the family's events and hook marks made elsewhere (a tensor-parallel rank's, parallel/tp.py)
    body, marks = marked if marked is not None else MARKED_FAMILIES[config.model.family](config)
    unit_name = units_of(config, ctx.params)
    units: dict[str, list[ParamTensor]] = {}
    for p in ctx.params:
        units.setdefault(unit_name[p.name], []).append(p)
    shards = {p.name: shard(p, n, rank) for p in ctx.params}
    gathered = {u: sum(shards[p.name].padded.numel for p in ps) * n for u, ps in units.items()}
    # the reduce-scatter input: the N padded chunks of the parameters with gradients (frozen ones have none)
    reduced_in = {u: sum(shards[p.name].padded.numel for p in ps if p.trainable) * n for u, ps in units.items()}
    local = {u: sum(shards[p.name].padded.numel for p in ps if p.trainable) for u, ps in units.items()}
    held = {u: sum(shards[p.name].padded.numel for p in ps) for u, ps in units.items()}
    # forward order of the blocks (FSDP2 prefetches in the order post-forward ran: a traced module's marks)
    order = [u for u in units if u != "root"] if config.model.family not in TRACED_FAMILIES else \
        [u for _, kind, u in marks if kind == "post_forward" and u in units and u != "root"]
    gloo_copy = ctx.device == "cpu"  # ProcessGroupGloo's reduce_scatter copies its input; NCCL does not

    state: dict[str, Any] = {"ag_kept": None, "prefetched": set(), "unsharded": set(), "rs_live": None,
                             "sync": True, "acc": set(), "sharded_grads": set()}
    # without a sync, FSDP2 keeps each unsharded gradient, cast to reduce_dtype first when that differs
    cast_to_reduce = r_b != g_b
    out: list[Event] = []

    def all_gather(u: str, phase: str) -> None:
        """The all-gather output; under the MixedPrecisionPolicy the shard's 16-bit cast lives through it.

        With CPU offload each shard is first copied to the device (``sharded_param_data.to(device)``),
        then cast if the policy says so (``FSDPParam.all_gather_inputs``); those inputs live until the
        all-gather returns.
        """
        if offload:
            inputs = []
            for p in units[u]:
                h2d = alloc(f"{p.name}.h2d", "temporary", shards[p.name].padded.numel * dt.shard, phase)
                out.append(h2d)
                if dt.cast_for_gather:
                    cast = alloc(f"{p.name}.h2d_cast", "temporary", shards[p.name].padded.numel * p_b, phase)
                    out.extend([cast, free(h2d.name, h2d.role, h2d.nbytes, phase)])
                    h2d = cast
                inputs.append(h2d)
            out.append(alloc(f"{u}.all_gather", "temporary", gathered[u] * p_b, phase))
            out.extend(free(e.name, e.role, e.nbytes, phase) for e in inputs)
            return
        if dt.cast_for_gather:
            out.append(alloc(f"{u}.all_gather_input", "temporary", held[u] * p_b, phase))
        out.append(alloc(f"{u}.all_gather", "temporary", gathered[u] * p_b, phase))
        if dt.cast_for_gather:
            out.append(free(f"{u}.all_gather_input", "temporary", held[u] * p_b, phase))

    def unshard(u: str, phase: str) -> None:
        if u not in state["prefetched"]:
            all_gather(u, phase)
        state["prefetched"].discard(u)
        # each parameter's all-gather output is padded to N chunks; the parameter is a view of its head
        out.extend(alloc(f"{p.name}.unsharded", "parameter", shards[p.name].padded.numel * n * p_b, phase)
                   for p in units[u])
        state["unsharded"].add(u)

    def reshard(u: str, phase: str) -> None:
        if u in state["unsharded"]:
            out.extend(free(f"{p.name}.unsharded", "parameter", shards[p.name].padded.numel * n * p_b, phase)
                       for p in units[u])
            state["unsharded"].discard(u)

    def hook(kind: str, u: str, phase: str) -> None:
        if u not in units:  # a module without parameters of its own: no group, only the root's state
            if kind == "post_forward" and u == "root" and state["ag_kept"] is not None:
                kept, state["ag_kept"] = state["ag_kept"], None
                out.append(free(f"{kept}.all_gather", "temporary", gathered[kept] * p_b, phase))
            return
        if kind == "pre_forward":
            unshard(u, phase)
            if state["ag_kept"] is not None:
                kept = state["ag_kept"]
                out.append(free(f"{kept}.all_gather", "temporary", gathered[kept] * p_b, phase))
            state["ag_kept"] = u
        elif kind == "post_forward":
            if u != "root" and reshard_after_forward:
                reshard(u, phase)
            if u == "root" and state["ag_kept"] is not None:
                kept, state["ag_kept"] = state["ag_kept"], None
                out.append(free(f"{kept}.all_gather", "temporary", gathered[kept] * p_b, phase))
        elif kind == "pre_backward":
            if u not in state["unsharded"]:
                unshard(u, phase)
                out.append(free(f"{u}.all_gather", "temporary", gathered[u] * p_b, phase))
            previous = order[order.index(u) - 1] if u != "root" and order.index(u) > 0 else (
                order[-1] if u == "root" and order else None)
            if previous is not None and previous not in state["unsharded"]:
                all_gather(previous, phase)
                state["prefetched"].add(previous)
        elif kind == "post_backward":
            trainable = [p for p in units[u] if p.trainable]
            if u in state["acc"]:  # accumulate_unsharded_grad_if_needed: the new gradients added, dropped
                out.extend(free(f"{p.name}.grad", "gradient", p.numel * g_b, phase) for p in trainable)
            reshard(u, phase)
            if not trainable:
                return
            if not state["sync"]:  # set_requires_gradient_sync(False): the unsharded gradients are kept
                if cast_to_reduce and u not in state["acc"]:  # to_accumulated_grad_if_needed: in reduce_dtype
                    for p in trainable:
                        out.append(alloc(f"{p.name}.acc", "gradient", p.numel * r_b, phase))
                        out.append(free(f"{p.name}.grad", "gradient", p.numel * g_b, phase))
                    state["acc"].add(u)
                return
            held_grads = [(f"{p.name}.acc", p.numel * r_b) if u in state["acc"] else (f"{p.name}.grad", p.numel * g_b)
                          for p in trainable]
            state["acc"].discard(u)
            if state["rs_live"] is not None:
                prev = state["rs_live"]
                out.append(free(f"{prev}.rs_input", "temporary", reduced_in[prev] * r_b, phase))
            out.append(alloc(f"{u}.rs_input", "temporary", reduced_in[u] * r_b, phase))
            # foreach_reduce clears its list of gradients after the copy-in; its loop variable keeps
            # the last one until it returns
            *early, last_grad = held_grads
            out.extend(free(name, "gradient", nbytes, phase) for name, nbytes in early)
            # a later micro-batch adds its reduced shard into the existing .grad (foreach_reduce's
            # ``to_accumulate_grad``): the output, or its cast to the shards' dtype, is a temporary
            accumulating = u in state["sharded_grads"] or offload  # offload: the shard goes to host memory
            state["sharded_grads"].add(u)
            if r_b == dt.shard and not accumulating:
                reduced = alloc(f"{u}.grad_shards", "gradient", local[u] * dt.shard, phase)
            else:
                reduced = alloc(f"{u}.reduce_output", "temporary", local[u] * r_b, phase)
            out.append(reduced)
            if gloo_copy:
                out.append(alloc(f"{u}.gloo_copy", "temporary", reduced_in[u] * r_b, phase))
                out.append(free(f"{u}.gloo_copy", "temporary", reduced_in[u] * r_b, phase))
            result = reduced
            if r_b != dt.shard:  # the reduce-dtype output cast to the shards' dtype, then dropped
                result = alloc(f"{u}.grad_shards", "gradient", local[u] * dt.shard, phase) if not accumulating \
                    else alloc(f"{u}.reduce_output_cast", "temporary", local[u] * dt.shard, phase)
                out.extend([result, free(reduced.name, reduced.role, reduced.nbytes, phase)])
            out.extend(free(name, "gradient", nbytes, phase) for name, nbytes in [last_grad])
            if accumulating:  # added into .grad in place (or copied to the host's .grad): dropped on return
                out.append(free(result.name, result.role, result.nbytes, phase))
            state["rs_live"] = u

    end = _end_events(config) if config.model.family in TRACED_FAMILIES else \
        family.end_of_step_events(config.model, config.training, shape)
    steps = config.training.grad_accum_steps
    accumulate = steps > 1
    for sync, events, where in _micro_batches(body, marks, steps, config.parallel.sync_every_micro_batch,
                                              cast_to_reduce):
        state["sync"] = sync
        at, done, count = 0, 0, len(events)
        # the events up to each hook's place copied as one slice: marks come in event order; one out of order
        # (or past the end) waits with the rest for the end, where the loop over each event left it
        while at < len(where) and done <= where[at][0] < count:
            index = where[at][0]
            out.extend(events[done:index])
            done = index
            # a hook runs between two events: it takes the phase of the one before it
            hook(where[at][1], where[at][2], events[index - 1].phase if index else events[index].phase)
            at += 1
        out.extend(events[done:])
        while at < len(where):
            hook(where[at][1], where[at][2], events[-1].phase)
            at += 1
        if state["rs_live"] is not None:
            prev, state["rs_live"] = state["rs_live"], None
            out.append(free(f"{prev}.rs_input", "temporary", reduced_in[prev] * r_b, "backward"))
        if accumulate:  # each micro-batch's output and loss dropped after its backward
            out.extend(after_backward(end))

    local_params = [shards[p.name].local for p in ctx.params if p.trainable]
    # zero_grad(set_to_none=True) in parameter order: a unit's flat gradient shard goes with its last view
    last = {}
    for p in ctx.params:
        if p.trainable:
            last[unit_name[p.name]] = p.name
    tail = [free(f"{unit_name[p.name]}.grad_shards", "gradient", local[unit_name[p.name]] * dt.shard, "zero_grad")
            for p in ctx.params if p.trainable and last[unit_name[p.name]] == p.name and not offload]
    tail += [] if accumulate else end
    setup = [alloc(p.name, "parameter", shards[p.name].padded.numel * dt.shard, "setup") for p in ctx.params
             if not offload]
    if ctx.device == "cpu":  # DeviceMesh keeps torch.arange(N, dtype=int32) as its rank map, always on the CPU
        setup.append(alloc("device_mesh.rank_map", "temporary", 4 * n, "setup"))
    if config.model.family in TRACED_FAMILIES:  # the hooked trace's buffers (fp32 under the policy) and inputs
        from estimator.families.module import trace_input_events

        setup += trace_input_events(_module_trace(config))
    else:
        setup += family.input_events(config.model, config.training, shape)
    return setup, out, tail, local_params


def _micro_batches(body: list[Event], marks: list[tuple[int, str, str]], steps: int, sync_every: bool,
                   cast_to_reduce: bool) -> list[tuple[bool, list[Event], list[tuple[int, str, str]]]]:
    """(sync, events, hook marks) of each micro-batch modelled: 3..K repeat the second (accumulation.py).

    FSDP2 syncs every micro-batch by default: each backward starts with no unsharded gradient, so every
    micro-batch's events are the first's. With ``sync_every_micro_batch: false``
    (``set_requires_gradient_sync(False)`` until the last), the unsharded gradients are kept between
    micro-batches: a later one's gradients are then added into them in place (the single-device
    accumulation), unless FSDP2 moved them to reduce_dtype copies (``unsharded_accumulated_grad``).
    """
    if steps <= 1:
        return [(True, body, marks)]
    if sync_every:
        return [(True, body, marks), (True, body, marks)]
    if cast_to_reduce:
        later, where = body, marks
    else:
        later, positions = later_micro_batch_at(body, frozenset(m[0] for m in marks))
        where = [(positions[i], kind, unit) for i, kind, unit in marks]
    middle = [(False, later, where)] if steps >= 3 else []
    return [(False, body, marks), *middle, (True, later, where)]


# --------------------------------------------------------------------------- communication (comm.py)
def fsdp_units(config: Config, params: list[ParamTensor]) -> dict[str, list[ParamTensor]]:
    """The ``fully_shard`` units in forward order, the root last: ``layers.i`` (mlp) or ``blocks.i``."""
    prefix = "layers." if config.model.family == "mlp" else UNIT_PREFIX
    units: dict[str, list[ParamTensor]] = {}
    named = units_of(config, params) if config.model.family in TRACED_FAMILIES else {}
    for p in params:
        unit = named[p.name] if named else \
            ".".join(p.name.split(".")[:2]) if p.name.startswith(prefix) else "root"
        units.setdefault(unit, []).append(p)
    return {**{u: ps for u, ps in units.items() if u != "root"}, **({"root": units["root"]} if "root" in units else {})}


def fsdp_communication(ctx: RankContext, strategy: str, reshard_after_forward: bool) -> CommParts:
    """FSDP2's collectives per rank (torch 2.13 ``_fsdp_collectives.py``, ``_fsdp_param_group.py``; the
    ZeRO paper's 3Ψ, Rajbhandari et al. 2020, section 7.2.2).

    Every unit is all-gathered before its forward (``all_gather_into_tensor``: input the rank's padded
    shards of the unit, flat; output N times that). With ``reshard_after_forward`` passed to
    ``fully_shard`` (as ``verify`` does, for the root too: only an unset value keeps the root gathered)
    every unit is resharded after its forward and all-gathered again before its backward, the root first.
    Every unit with gradients is reduce-scattered after its backward (``reduce_scatter_tensor``: input the
    N padded chunks of its trainable parameters, output one chunk). ProcessGroupGloo has no reduce-scatter
    of its own: it all-reduces a copy of the whole input and keeps its chunk, so on the CPU (gloo) each is an
    all-reduce of the whole input. Shard(0) pads every tensor to N·ceil(rows/N) rows, so every rank hands
    over the same bytes. Dtypes: :func:`~estimator.parallel.comm.collective_dtypes`.
    """
    n = ctx.world_size
    dt = collective_dtypes(ctx.config, strategy)
    gather, reduce = KindVolume(), KindVolume()
    padded = {p.name: prod(padded_shape(p.shape, n)) for p in ctx.params}  # = shard(p, n, r).padded.numel
    for unit, ps in fsdp_units(ctx.config, ctx.params).items():
        chunk = sum(padded[p.name] for p in ps)  # the same for every rank
        one = KindVolume(1, chunk * dt.parameter_bytes, n * chunk * dt.parameter_bytes)
        gather += one.times(2 if reshard_after_forward and unit != "root" else 1)
        grads = sum(padded[p.name] for p in ps if p.trainable)
        if grads:
            full = n * grads * dt.gradient_bytes
            reduce += KindVolume(1, full, full if ctx.device == "cpu" else grads * dt.gradient_bytes)
    reduce_kind = "all_reduce" if ctx.device == "cpu" else "reduce_scatter"
    return CommParts(CommVolume.of(n, {"all_gather": gather}), CommVolume.of(n, {reduce_kind: reduce}),
                     empty(n), empty(n))
