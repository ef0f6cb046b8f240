"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) as torch runs it: ``--parallel tp`` (docs/tp.md).

torch's plan for the transformer family (torchtitan's for Llama, ``estimator.measure.tp``): q/k/v and
the MLP's gate/up ``ColwiseParallel``, the attention output and MLP down ``RowwiseParallel``, the token
embedding ``RowwiseParallel`` over the vocabulary rows, the head ``ColwiseParallel`` (its logits
all-gathered, or kept vocabulary-sharded into the loss with ``parallel.loss_parallel``), norms
replicated. A rank holds 1/t of every sharded matrix and all of the replicated tensors
(Llama-2-7B at t = 2: (P - norm weights)/2 + norm weights parameters).

Every rank of a TP group holds the same sizes, so there is one distinct rank. Its step is the
family's event simulation run with this rank's sizes (heads H/t and K/t, d_ff/t, vocabulary V/t) and
the collectives' buffers where torch allocates them (``transformer_events``, ``split=``): a
row-parallel output is all-reduced into a new tensor; a column-parallel input's gradient is all-reduced
into a new tensor by the ``from_local`` node before it; the head's logits are all-gathered into a
flat buffer and concatenated. Those sizes and moments were read off torch 2.13 on gloo
(``ESTIMATOR_DIST_EVENTS``) and are checked against real ranks in ``tests/test_tp.py`` and
``benchmarks/tp_accuracy.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from estimator.config import Config
from estimator.errors import EstimatorError
from estimator.events import Event, alloc, free
from estimator.families.base import ParamTensor, get_family
from estimator.parallel.base import RankContext, RankEstimate, RankStep, local_model_states, register_strategy
from estimator.simulate import _shape_key, layered_step, optimizer_step_events, state_events, step_shape

if TYPE_CHECKING:
    from estimator.parallel.comm import CommParts


def tp_degree(config: Config, strategy: str, world_size: int) -> int:
    """The tensor-parallel degree t in force: the world size for ``tp`` alone (``parallel.tp_size`` must agree)."""
    t = config.parallel.tp_size
    if strategy == "tp":
        if t not in (1, world_size):
            raise EstimatorError(f"parallel.tp_size: {t} differs from the world size {world_size}; --parallel tp "
                                 f"alone puts every rank in one tensor-parallel group (for dp x tp use fsdp)")
        return world_size
    return t


def mesh_strategy(config: Config, strategy: str) -> MeshStrategy | None:
    """FSDP2 x TP on a 2-D mesh for zero3/fsdp with ``parallel.tp_size`` > 1; None for a 1-D layout."""
    if strategy == "tp" or config.parallel.tp_size == 1:
        return None
    if strategy not in ("zero3", "fsdp"):
        raise EstimatorError(f"parallel.tp_size: {config.parallel.tp_size} with --parallel {strategy}: a 2-D mesh "
                             f"is modelled with fsdp or zero3 (FSDP2 x TP); use one of them, or --parallel tp")
    return MeshStrategy(strategy)


def plain_blocks(config: Config, strategy: str | None) -> Config:
    """Under tensor parallelism, the config without the transformers-style options an ``hf_config`` sets.

    The modelled plan (torchtitan's, above) shards the project's blocks: q/k/v and gate/up as separate
    column-parallel projections, its loss and rotary embedding. The options that make the step
    transformers' (docs/transformer.md) are not modelled with it, so they are switched off for the
    estimate, and the estimate says so (``analytic_omissions``) instead of refusing the model.
    """
    from estimator.families.transformer import DROPOUT_OPTIONS, HF_STYLE_OPTIONS

    model = config.model
    if model.family != "transformer" or not (strategy == "tp" or config.parallel.tp_size > 1):
        return config
    names = [f for f in HF_STYLE_OPTIONS if getattr(model, f, False)]
    update: dict[str, object] = dict.fromkeys(names, False)
    dropouts = [f for f in DROPOUT_OPTIONS if getattr(model, f, 0.0)]  # the dropouts too: not modelled with TP
    update.update(dict.fromkeys(dropouts, 0.0))
    names += dropouts
    if model.mlp == "gelu_new":
        names.append("mlp: gelu_new")
        update["mlp"] = "gelu"
    if not names:
        return config
    plain = config.model_copy(update={"model": model.model_copy(update=update)})
    plain._omissions = (*config.analytic_omissions,
                        f"under tensor parallelism the estimate shards the project's blocks (torchtitan's plan, "
                        f"docs/tp.md) without the transformers-style options {', '.join(names)} "
                        f"(an hf_config sets them; they are modelled on one device)")
    return plain


def check_layout(config: Config, t: int) -> None:
    """What the modelled plan supports: the transformer family, sharded sizes divisible by t."""
    from estimator.families.transformer import check_tensor_parallel

    if config.model.family != "transformer":
        raise EstimatorError(f"--parallel tp: tensor parallelism is modelled for the transformer family, "
                             f"not {config.model.family!r}")
    if config.parallel.sequence_parallel and config.model.positions == "learned":
        raise EstimatorError("parallel.sequence_parallel: needs positions: rope (a learned position table is added "
                             "to the whole sequence, which the sequence-sharded stream no longer holds)")
    if config.parallel.sequence_parallel and config.training.seq_len is not None and config.training.seq_len % t:
        raise EstimatorError(f"training.seq_len: {config.training.seq_len} is not divisible by the tensor-parallel "
                             f"degree {t} (sequence parallelism shards each sequence)")
    check_tensor_parallel(config.model, t)


def local_parameters(config: Config, t: int) -> list[ParamTensor]:
    """This rank's parameter tensors (their local shapes), in ``named_parameters()`` order."""
    from estimator.families.transformer import sharded_parameter_tensors

    return sharded_parameter_tensors(config.model, t)


def gradient_numel(config: Config, p: ParamTensor) -> int:
    """Elements of a parameter's ``.grad`` storage: DTensor's embedding backward makes the whole (V, d)
    gradient and the Shard(0) ``.grad`` is a view of it (measured: 12,288 B for a 48 x 32 fp32 shard);
    a tied head's gradient comes first, and AccumulateGrad's out-of-place sum is shard-sized."""
    if p.name == "tok_emb.weight" and not config.model.tie_embeddings:
        return config.model.vocab_size * config.model.d_model
    return p.numel


def tp_events(config: Config, t: int, device: str, impl: str, step_bytes: int
              ) -> tuple[list[Event], list[Event], list[Event]]:
    """Setup, first and steady step of one tensor-parallel rank (every rank alike)."""
    from estimator.families.transformer_events import TensorParallel, step_events_with_marks
    from estimator.optimizers import get_optimizer

    family = get_family(config.model.family)
    shape = step_shape(config)
    spec = get_optimizer(config.optimizer.name)
    params = local_parameters(config, t)
    trainable = [p for p in params if p.trainable]
    layout = TensorParallel(t, config.parallel.sequence_parallel, config.parallel.loss_parallel)
    body, _ = step_events_with_marks(config.model, config.training, shape, layout)
    setup = [alloc(p.name, "parameter", p.numel * shape.parameter_bytes, "setup") for p in params]
    if device == "cpu":  # DeviceMesh keeps torch.arange(t, dtype=int32) as its rank map, always on the CPU
        setup.append(alloc("device_mesh.rank_map", "temporary", 4 * t, "setup"))
    setup += family.input_events(config.model, config.training, shape)
    if spec.state_init == "constructor":
        setup += state_events(spec, params, config, "setup", step_bytes)
    tail = [free(f"{p.name}.grad", "gradient", gradient_numel(config, p) * shape.gradient_bytes, "zero_grad")
            for p in trainable]
    tail += family.end_of_step_events(config.model, config.training, shape)
    first = body + optimizer_step_events(spec, trainable, config, impl, step_bytes, first=True) + tail
    steady = body + optimizer_step_events(spec, trainable, config, impl, step_bytes, first=False) + tail
    return setup, first, steady


#: how many times each optimizer's single-tensor step reads ``grad`` (torch 2.13 ``torch/optim``): under sequence
#: parallelism the replicated norm weights' gradients are Partial DTensors, all-reduced at every read
#: (Adam measured: 3 per norm weight; the others read off the code)
GRADIENT_READS = {"sgd": 1, "momentum": 1, "adam": 3, "adamw": 3, "adagrad": 3, "rmsprop": 3}


def tp_communication(config: Config, t: int, device: str = "cuda") -> CommParts:
    """One TP rank's collectives per micro-batch, as read off torch 2.13's flight recorder on gloo.

    T = B·S tokens, d the width, s the residual stream's bytes per element (the parameter dtype), a the
    activations' (16-bit under autocast). Without sequence parallelism (every collective an all-reduce
    but the logits' all-gather): the embedding's (T·d·s); per block the two row-parallel outputs' in
    forward (T·d·a each) and one per column-parallel input gradient in backward (q, k, v and the MLP's
    gate/up or up: T·d·s each); the head's input gradient's (T·d·s). Megatron-LM's count is four
    all-reduces of T·d per block and step (Shoeybi et al. 2019, Figure 4: two in forward, two in
    backward); torch's plan all-reduces q, k and v's input gradients separately.

    With sequence parallelism (Korthikanti et al. 2022, section 4.2.2: each all-reduce becomes a
    reduce-scatter plus an all-gather of the same total size): the embedding's and each row-parallel
    output's reduce-scatter (input T·d, output T·d/t) and in backward the all-gather of their gradients;
    the all-gather before each block's attention and MLP and before the head (input T·d/t, output T·d)
    and in backward the reduce-scatter of their input gradients. ProcessGroupGloo has no reduce-scatter:
    on the CPU each is an all-reduce of the whole input. The replicated norm weights' gradients are
    Partial: ``optimizer.step()`` all-reduces one (d elements) at each read of the gradient
    (:data:`GRADIENT_READS`; other optimizers: not counted).

    With activation checkpointing (``training.activation_checkpointing: full``, per block, non-reentrant, as
    torchtitan's ``checkpoint_wrapper``) each block's forward runs again in its backward and re-runs its
    collectives up to the last tensor the backward needs: torch stops the recomputation once down_proj has
    saved its input (``torch.utils.checkpoint``'s early stop, on by default), before its matmul and so before
    its all-reduce or reduce-scatter. Re-run per block: the attention output's all-reduce (T·d·a); under SP the
    all-gathers before attention and MLP (T·d/t·s -> T·d·s) and the attention output's reduce-scatter.

    The logits: an all-gather (input T·V/t·a, output T·V·a; the recorder writes the functional
    all-gather's input size for both, the tracker sees the T·V·a buffer), or with loss_parallel three
    all-reduces of T elements: the row maxima and the sums of exponentials in fp32, the target logits in the
    loss's dtype (measured in bf16: 128, 128 and 64 B for T = 32).
    """
    from estimator.parallel.comm import CommParts, CommVolume, KindVolume

    m, tr = config.model, config.training
    plan = step_shape(config)
    tokens = tr.batch_size * (tr.seq_len if tr.seq_len is not None else m.max_seq_len)
    s, a = plan.parameter_bytes, plan.activation_bytes
    loss_bytes = 4 if plan.autocast else a
    layers, full = m.num_layers, tokens * m.d_model

    def one(n: int, kind: str = "all_reduce", shrink: bool = False) -> dict[str, KindVolume]:
        if kind == "reduce_scatter" and device == "cpu":  # gloo: an all-reduce of the whole input
            return {"all_reduce": KindVolume(1, n, n)}
        return {kind: KindVolume(1, n, n // t if shrink else n * t if kind == "all_gather" else n)}

    calls: list[tuple[dict[str, KindVolume], int]] = []
    optimizer: list[tuple[dict[str, KindVolume], int]] = []
    if config.parallel.sequence_parallel:
        calls += [(one(full * s, "reduce_scatter", True), 1), (one(full * s // t, "all_gather"), 1)]  # embedding
        calls += [(one(full * a, "reduce_scatter", True), 2 * layers), (one(full * a // t, "all_gather"), 2 * layers)]
        calls += [(one(full * s // t, "all_gather"), 2 * layers + 1),  # before attention, MLP and head
                  (one(full * s, "reduce_scatter", True), 2 * layers + 1)]
        if tr.activation_checkpointing == "full":  # the recomputed forward: 2 gathers, o_proj's reduce-scatter
            calls += [(one(full * s // t, "all_gather"), 2 * layers), (one(full * a, "reduce_scatter", True), layers)]
        norms = [p for p in local_parameters(config, t) if ".norm" in p.name or p.name.startswith("norm_f")]
        reads = GRADIENT_READS.get(config.optimizer.name, 0)
        optimizer += [(one(p.numel * plan.gradient_bytes), reads) for p in norms]
    else:
        cols = 3 + (2 if m.mlp == "swiglu" else 1)
        calls += [(one(full * s), 1), (one(full * a), 2 * layers), (one(full * s), cols * layers + 1)]
        if tr.activation_checkpointing == "full":  # the recomputed forward: o_proj's all-reduce
            calls.append((one(full * a), layers))
    if config.parallel.loss_parallel:  # the max and the sum of exponentials in fp32, the target logits as is
        calls += [(one(tokens * 4), 2), (one(tokens * loss_bytes), 1)]
    else:
        calls.append((one(tokens * (m.vocab_size // t) * a, "all_gather"), 1))

    def volume(parts: list[tuple[dict[str, KindVolume], int]]) -> CommVolume:
        total = CommVolume.of(t, {})
        for kinds, times in parts:
            total = total + CommVolume.of(t, {k: v.times(times) for k, v in kinds.items()})
        return total

    empty = CommVolume.of(t, {})
    return CommParts(volume(calls), empty, volume(optimizer), empty)


@register_strategy
class TensorParallelStrategy:
    """TP alone: ``world_size`` ranks in one tensor-parallel group."""

    name = "tp"

    def groups(self, ctx: RankContext) -> list[tuple[tuple[tuple[int, int], ...], int]]:
        return [(((0, ctx.world_size - 1),), 0)]  # every rank holds the same sizes

    def communication(self, ctx: RankContext, rank: int) -> CommParts:
        t = tp_degree(ctx.config, self.name, ctx.world_size)
        check_layout(ctx.config, t)
        return tp_communication(ctx.config, t, ctx.device)

    def estimate(self, ctx: RankContext, rank: int) -> RankEstimate:
        config, device = ctx.config, ctx.device
        t = tp_degree(config, self.name, ctx.world_size)
        check_layout(config, t)
        if t == 1:
            raise EstimatorError("--world-size: tensor parallelism needs at least 2 ranks, got 1")

        def build(cfg: Config) -> tuple[list[Event], list[Event], list[Event]]:
            return tp_events(cfg, t, device, ctx.impl, ctx.step_bytes)

        key = (_shape_key(config, device), "tp", t)
        step = layered_step(config, build, ctx.round if device == "cuda" else None, key)
        parameters, gradients, state, step_tensors = tp_model_states(ctx, t)
        saved = step.saved_activation_bytes
        return RankEstimate(self.name, ctx.world_size, rank, parameters, gradients, state, step_tensors, saved, 0,
                            RankStep(step.first_peak, step.steady_peak, saved))


def tp_model_states(ctx: RankContext, t: int) -> tuple[int, int, int, int]:
    """A TP rank's parameters, gradients, optimizer state and 'step' scalars, in bytes, without its step:
    the rank's local tensors (``local_parameters``: column- and row-parallel weights split t ways, the
    rest replicated; Megatron-LM, Shoeybi et al. 2019, section 3), each with its gradient and its state."""
    params = local_parameters(ctx.config, t)
    trainable = [p for p in params if p.trainable]
    parameters = sum(p.numel for p in params) * ctx.plan.parameter_bytes
    gradients = sum(gradient_numel(ctx.config, p) for p in trainable) * ctx.plan.gradient_bytes
    state, step_tensors = local_model_states(ctx, trainable)
    return parameters, gradients, state, step_tensors


class MeshStrategy:
    """FSDP2 x TP on a ``(dp, tp)`` mesh (torchtitan's 2-D layout): TP inside each group of t consecutive
    ranks, then ``fully_shard`` per block and on the root over the ``dp`` dimension, which shards every
    TP-local tensor along dim 0 (FSDP2's Shard(0), padded) over the dp = N/t data-parallel ranks.

    A rank's step is FSDP2's per-unit hooks (``fsdp.unit_events``) run over this file's TP-local events
    (the TP sizes, collectives and hook marks of ``transformer_events``); rank r is (r // t, r mod t) on
    the mesh, and ranks differ only by their dp index (which rows of each TP-local tensor they hold).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def _sizes(self, ctx: RankContext) -> tuple[int, int]:
        t = ctx.config.parallel.tp_size
        if ctx.world_size % t or ctx.world_size == t:
            raise EstimatorError(f"--world-size: a {self.name} x tp mesh needs a multiple of parallel.tp_size = {t} "
                                 f"with at least 2 data-parallel shards, got {ctx.world_size}")
        check_layout(ctx.config, t)
        return ctx.world_size // t, t

    def groups(self, ctx: RankContext) -> list[tuple[tuple[tuple[int, int], ...], int]]:
        from estimator.parallel.fsdp import shard_groups

        dp, t = self._sizes(ctx)
        out = []
        for ranges, rep in shard_groups(local_parameters(ctx.config, t), dp):
            out.append((tuple((a * t, (b + 1) * t - 1) for a, b in ranges), rep * t))
        return out

    def communication(self, ctx: RankContext, rank: int) -> CommParts:
        dp, t = self._sizes(ctx)
        return ctx.shared("mesh_communication", lambda: mesh_communication(ctx.config, self.name, dp, t, ctx.device))

    def estimate(self, ctx: RankContext, rank: int) -> RankEstimate:
        from estimator.parallel.fsdp import ShardDtypes, shard

        config, device = ctx.config, ctx.device
        dp, t = self._sizes(ctx)
        reshards = True if self.name == "zero3" else config.parallel.reshard_after_forward
        params = local_parameters(config, t)
        dp_rank = rank // t

        def build(cfg: Config) -> tuple[list[Event], list[Event], list[Event]]:
            return mesh_events(cfg, dp, t, dp_rank, device, reshards)

        key = (_shape_key(config, device), "fsdp-tp", reshards, t)
        step = layered_step(config, build, ctx.round if device == "cuda" else None, key)
        shards = [shard(p, dp, dp_rank) for p in params]
        dtypes = ShardDtypes.of(ctx)
        parameters = sum(x.padded.numel for x in shards) * dtypes.shard
        gradients = dtypes.shard * sum(x.padded.numel for x, p in zip(shards, params, strict=True) if p.trainable)
        state, step_tensors = local_model_states(ctx, [x.local for x, p in zip(shards, params, strict=True)
                                                       if p.trainable])
        saved = step.saved_activation_bytes
        return RankEstimate(self.name, ctx.world_size, rank, parameters, gradients, state, step_tensors, saved, 0,
                            RankStep(step.first_peak, step.steady_peak, saved))


def mesh_events(config: Config, dp: int, t: int, dp_rank: int, device: str, reshards: bool
                ) -> tuple[list[Event], list[Event], list[Event]]:
    """One rank of the (dp, tp) mesh: FSDP2's hooks over the TP rank's events."""
    from estimator.families.transformer_events import TensorParallel, step_events_with_marks
    from estimator.parallel.fsdp import unit_events

    small = RankContext(config, dp, device)
    params = local_parameters(config, t)
    small.params, small.trainable = params, [p for p in params if p.trainable]
    layout = TensorParallel(t, config.parallel.sequence_parallel, config.parallel.loss_parallel)
    marked = step_events_with_marks(config.model, config.training, step_shape(config), layout)
    setup, first, steady = unit_events(small, dp_rank, reshard_after_forward=reshards, marked=marked)
    whole = {p.name: gradient_numel(config, p) * step_shape(config).gradient_bytes for p in params}

    def fix(events: list[Event]) -> list[Event]:
        # FSDP2 frees each unsharded gradient after its reduce-scatter: the embedding's is the whole (V, d)
        out = []
        for e in events:
            if e.nbytes < 0 and e.role == "gradient" and e.name.endswith(".grad") and e.name[:-5] in whole:
                e = free(e.name, e.role, whole[e.name[:-5]], e.phase)
            elif e.name == "device_mesh.rank_map":  # the 2-D mesh's rank map: dp x tp int32
                e = alloc(e.name, e.role, 4 * dp * t, e.phase)
            out.append(e)
        return out

    return fix(setup), fix(first), fix(steady)


def mesh_communication(config: Config, strategy: str, dp: int, t: int, device: str) -> CommParts:
    """One rank's collectives on a ``(dp, tp)`` mesh, per process group (:class:`~estimator.parallel.comm.MeshVolume`).

    ``dp`` (N/t ranks): FSDP2's all-gathers and reduce-scatters (:func:`~estimator.parallel.fsdp.fsdp_communication`)
    of this rank's TP-local tensors, each sharded along dim 0 over the dp ranks; ``wrap_tp`` passes
    ``reshard_after_forward`` to the root's ``fully_shard`` too, so with it the root is gathered again before
    its backward like every block (measured: 6 gathers for 2 blocks, where 1-D FSDP2 with the root's default
    makes 5). ``tp`` (t ranks): the TP plan's
    collectives of :func:`tp_communication`, but for sequence parallelism's replicated norm weights: FSDP2's
    post-backward redistributes each unsharded Partial gradient to its TP placement (Replicate) before the
    reduce-scatter (torch 2.13 ``_fsdp_param.py``, ``_get_grad_inner_tensor``), one all-reduce of the norm weight's
    gradient per backward, so ``optimizer.step()`` reads plain local gradients and all-reduces nothing.
    """
    from estimator.parallel.comm import CommParts, CommVolume, KindVolume, MeshVolume
    from estimator.parallel.fsdp import fsdp_communication

    small = RankContext(config, dp, device)
    params = local_parameters(config, t)
    small.params, small.trainable = params, [p for p in params if p.trainable]
    reshards = True if strategy == "zero3" else config.parallel.reshard_after_forward
    fsdp = fsdp_communication(small, strategy, reshards)
    if reshards:
        from math import prod

        from estimator.parallel.comm import collective_dtypes
        from estimator.parallel.fsdp import fsdp_units

        root = fsdp_units(config, params).get("root", [])
        chunk = sum(-(-p.shape[0] // dp) * prod(p.shape[1:]) for p in root)  # the padded shard, as fsdp's
        chunk *= collective_dtypes(config, strategy).parameter_bytes
        if chunk:
            fsdp = replace(fsdp, micro_batch=fsdp.micro_batch + CommVolume.of(dp, {"all_gather": KindVolume(
                1, chunk, dp * chunk)}))
    tp = tp_communication(config, t, device)
    norm_sync = CommVolume.of(t, {})
    if config.parallel.sequence_parallel:
        grad_bytes = step_shape(config).gradient_bytes
        for p in params:
            if p.trainable and (".norm" in p.name or p.name.startswith("norm_f")):
                n = p.numel * grad_bytes
                norm_sync = norm_sync + CommVolume.of(t, {"all_reduce": KindVolume(1, n, n)})

    def mesh(dp_part: CommVolume, tp_part: CommVolume) -> MeshVolume:
        return MeshVolume.of(dp * t, {"dp": dp_part, "tp": tp_part})

    return CommParts(mesh(fsdp.micro_batch, tp.micro_batch), mesh(fsdp.gradient_sync, norm_sync),
                     mesh(fsdp.optimizer_step, CommVolume.of(t, {})), mesh(fsdp.second_forward, tp.second_forward))
