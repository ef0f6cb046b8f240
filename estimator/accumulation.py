"""Gradient accumulation: ``training.grad_accum_steps`` micro-batches before one optimizer step.

The loop modelled (and run by ``verify``)::

    for i in range(K):
        loss = loss_fn(model(x), y)   # or model(x, y)
        loss.backward()
        del pred, loss                # each micro-batch's output and loss dropped after its backward
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

The loss is not divided by K here (a division adds one scalar and its backward node; HF's Trainer
divides). The first micro-batch is the single step's forward and backward: every gradient appears
and is kept (AccumulateGrad steals the incoming tensor). In every later micro-batch the gradients
already exist, so AccumulateGrad adds each incoming gradient into ``.grad`` in place and drops it
(``torch/csrc/autograd/functions/accumulate_grad.h``, ``accumulateGrad``: ``variable_grad += new_grad``
when grad mode is off); the engine runs an AccumulateGrad node as soon as the node that made its
gradient is done (its sequence number is the largest), so the incoming tensor lives until then
(:func:`later_micro_batch_at`). A later micro-batch
returns to the bytes it started from, so micro-batches 3..K repeat the second's peak exactly: the
step is modelled as two micro-batches for any K >= 2, which is exact and costs the same for every K.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from estimator.events import Event, alloc, free

#: suffix of the tensors of micro-batches 2..K (so one micro-batch's saved activations are told apart)
LATER = "@later"


def later_micro_batch(body: list[Event]) -> list[Event]:
    """The forward and backward of micro-batch 2..K, from the first micro-batch's events ``body``."""
    return later_micro_batch_at(body, frozenset())[0]


def later_micro_batch_at(body: list[Event], boundaries: frozenset[int]) -> tuple[list[Event], list[int]]:
    """:func:`later_micro_batch`, and where each event of ``body`` begins in the result (for hook marks).

    ``boundaries``: indices of ``body`` before which a hook runs (FSDP2's), by then every pending
    incoming gradient has been accumulated.

    A parameter's gradient (``<p>.grad``, role gradient) becomes a temporary, added into ``.grad`` by
    AccumulateGrad once the backward node that made it has finished: it is freed just before the next
    allocation that follows a release (the node's other outputs are made first, then it drops its saved
    inputs). The out-of-place sum of a reused weight's second gradient (``<p>.grad_sum`` renamed to
    ``<p>.grad``) is an in-place add, so it and the rename disappear.
    """
    out: list[Event] = []
    # a weight used twice (tied embeddings): its first gradient waits in the engine's input buffer for
    # the second (``<p>.grad_extra``), is summed with it, then accumulated: both go when the second does
    reused = {e.name[: -len("_extra")] for e in body if e.name.endswith(".grad_extra") and e.nbytes > 0}
    waiting: dict[str, Event] = {}
    renamed: set[str] = set()  # parameters whose .grad was freed in this body (a rename follows)
    pending: list[Event] = []  # incoming gradients of the running node, not yet accumulated
    released = False  # the running node has released something since its last incoming gradient

    def accumulate() -> None:
        nonlocal released
        out.extend(free(e.name, e.role, e.nbytes, e.phase) for e in pending)
        pending.clear()
        released = False

    positions: list[int] = []
    for index, e in enumerate(body):
        if index in boundaries and pending:
            accumulate()
        positions.append(len(out))
        if e.phase == "backward" and e.name.endswith(".grad_sum"):
            continue
        if e.role == "gradient" and e.name.endswith(".grad") and e.phase == "backward":
            if e.nbytes < 0:
                renamed.add(e.name)
                continue
            if e.name in renamed:
                renamed.discard(e.name)
                continue
            if pending and released:
                accumulate()
            incoming = alloc(f"{e.name}.incoming", "temporary", e.nbytes, e.phase)
            out.append(incoming)
            if e.name in reused:
                waiting[e.name + "_extra"] = incoming
            else:
                pending.append(incoming)
            continue
        if e.nbytes < 0 and e.name in waiting:
            first = waiting.pop(e.name)
            out += [e, free(first.name, first.role, first.nbytes, e.phase)]
            continue
        if pending:
            if e.nbytes > 0 and released:
                accumulate()
            elif e.nbytes < 0:
                released = True
            if e.phase != "backward":
                accumulate()
        out.append(e)
    accumulate()
    positions.append(len(out))
    return out, positions


def accumulated_body(body: list[Event], after_each: list[Event], steps: int) -> list[Event]:
    """The forward/backward part of a step of ``steps`` micro-batches (``after_each``: the output and
    loss dropped after each backward). ``steps == 1`` is the plain step, unchanged."""
    if steps <= 1:
        return body
    dropped = after_backward(after_each)
    return body + dropped + later_named_apart(body) + named_apart(dropped)


def later_named_apart(body: list[Event]) -> list[Event]:
    """The later micro-batch (:func:`later_micro_batch`) with the tensors it makes named apart from the first's."""
    later = later_micro_batch(body)
    made = {e.name for e in later if e.nbytes > 0}
    return [Event(e.name + LATER, e.role, e.nbytes, e.phase) if e.name in made else e for e in later]


def named_apart(events: list[Event]) -> list[Event]:
    """``events`` as the later micro-batch's (the output and loss it drops)."""
    return [Event(e.name + LATER, e.role, e.nbytes, e.phase) for e in events]


def after_backward(end_of_step: list[Event]) -> list[Event]:
    """A family's end-of-step frees (the output and loss), done after each micro-batch's backward."""
    return [Event(e.name, e.role, e.nbytes, "backward") for e in end_of_step]


def scale_flops(flops: Any, steps: int) -> Any:
    """A step's FLOPs with ``steps`` micro-batches: every forward/backward term times ``steps``."""
    if steps <= 1:
        return flops
    return replace(flops, forward=flops.forward * steps, backward=flops.backward * steps,
                   matmul=flops.matmul * steps, matmul_forward=flops.matmul_forward * steps,
                   attention=flops.attention * steps, tokens=flops.tokens * steps)


def data_parallel_ranks(config: Any) -> int:
    """Ranks that each see a different micro-batch: the world size over the tensor-parallel degree."""
    parallel = config.parallel
    if parallel.strategy == "none":
        return 1
    return max(1, parallel.world_size // max(1, getattr(parallel, "tp_size", 1)))


def global_batch(config: Any, batch_size: int) -> int:
    """Samples per optimizer step: micro-batch x accumulation steps x data-parallel ranks."""
    return batch_size * config.training.grad_accum_steps * data_parallel_ranks(config)
