"""Tensor (and sequence) parallelism on the project's transformer, as torch runs it (``--parallel tp``).

The plan is the one torchtitan applies to Llama (``torchtitan/models/llama3/infra/parallelize.py``,
``apply_tp``), written for this model's module names with ``torch.distributed.tensor.parallel``:

* ``tok_emb``: ``RowwiseParallel(input_layouts=Replicate())``, its output ``Replicate()`` (an all-reduce)
  or ``Shard(1)`` under sequence parallelism (a reduce-scatter); the weight is ``Shard(0)`` (vocab rows);
* per block: ``attn.{q,k,v}_proj`` and ``mlp.{gate,up}_proj`` ``ColwiseParallel()``, ``attn.o_proj`` and
  ``mlp.down_proj`` ``RowwiseParallel()`` (output ``Shard(1)`` under SP); under SP the norms are
  ``SequenceParallel()`` and ``attn``/``mlp`` get ``PrepareModuleInput`` (Shard(1) -> Replicate, an
  all-gather); without SP the norms are left alone (replicated plain parameters);
* ``norm_f``: ``SequenceParallel()`` under SP; the head ``ColwiseParallel`` with output ``Replicate()``
  (an all-gather of the logits) or, with ``parallel.loss_parallel``, ``Shard(-1)`` kept as a DTensor into
  ``cross_entropy`` under ``loss_parallel()``. A tied head shares the embedding's ``Shard(0)`` weight.

Each attention module is told its local head counts (H/t, K/t), as torchtitan does. Every rank builds
the same model from the same seed, so the plan takes each rank's shard locally (``src_data_rank=None``)
instead of scattering it from rank 0: setup moves no data, and the step is unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from estimator.config import Config


def tp_mesh(world_size: int, tp: int) -> Any:
    """The device mesh: ``(tp,)`` for TP alone, ``(dp, tp)`` named ``("dp", "tp")`` for a 2-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dp = world_size // tp
    if dp == 1:
        return init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def parallelize(model: nn.Module, config: Config, mesh: Any) -> nn.Module:
    """Apply the TP (+ SP) plan to the project's ``Transformer`` on ``mesh`` (its ``tp`` dimension)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp_mesh = mesh["tp"] if mesh.ndim > 1 else mesh
    t = tp_mesh.size()
    sp = config.parallel.sequence_parallel
    lp = config.parallel.loss_parallel
    cfg = config.model
    tied = getattr(model, "lm_head", None) is None
    if tied:  # a head module that shares the embedding's weight, so ColwiseParallel can shard it
        head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, device="meta")
        head.weight = model.tok_emb.weight
        model.lm_head = head
    seq = Shard(1)
    root: dict[str, Any] = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq if sp else Replicate()),
        "lm_head": ColwiseParallel(input_layouts=seq if sp else Replicate(),
                                   output_layouts=Shard(-1) if lp else Replicate(), use_local_output=not lp),
    }
    if sp:
        root["norm_f"] = SequenceParallel()
    parallelize_module(model, tp_mesh, root, src_data_rank=None)
    for block in model.blocks:
        plan: dict[str, Any] = {
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=seq if sp else Replicate()),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=seq if sp else Replicate()),
        }
        if cfg.mlp == "swiglu":
            plan["mlp.gate_proj"] = ColwiseParallel()
        if sp:
            plan |= {
                "norm1": SequenceParallel(), "norm2": SequenceParallel(),
                "attn": PrepareModuleInput(input_layouts=(seq, None, None), desired_input_layouts=(Replicate(), None,
                                                                                                   None)),
                "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            }
        parallelize_module(block, tp_mesh, plan, src_data_rank=None)
        block.attn.num_heads //= t
        block.attn.kv_heads //= t
    if tied:  # one parameter again: the head's DTensor is the embedding's
        model.lm_head.weight = model.tok_emb.weight
    return model


def loss_context(config: Config) -> contextlib.AbstractContextManager[Any]:
    """``loss_parallel()`` around the loss and backward when the logits stay vocabulary-sharded."""
    if config.parallel.loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


def wrap_tp(model: nn.Module, config: Config, strategy: str, world_size: int, mp_policy: Any = None) -> nn.Module:
    """TP alone (``strategy == "tp"``), or TP then FSDP2 over the ``dp`` dimension of a 2-D mesh (torchtitan),
    with FSDP2's ``MixedPrecisionPolicy`` ``mp_policy`` (``training.master_weights``) when given."""
    mesh = tp_mesh(world_size, config.parallel.tp_size if strategy != "tp" else world_size)
    model = parallelize(model, config, mesh)
    if strategy == "tp":
        return model
    from torch.distributed.fsdp import fully_shard

    reshard = True if strategy == "zero3" else config.parallel.reshard_after_forward
    dp = mesh["dp"] if mesh.ndim > 1 else None
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        fully_shard(block, mesh=dp, reshard_after_forward=reshard, **policy)
    fully_shard(model, mesh=dp, reshard_after_forward=reshard, **policy)
    return model
