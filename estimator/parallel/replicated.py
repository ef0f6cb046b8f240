"""Strategies whose ranks each hold every parameter: DDP and ZeRO-1/2. One rank's step is the shared
forward/backward (summarised once for all ranks), then ``optimizer.step()`` over the rank's own
partition, then ``zero_grad``; only the optimizer part and the setup differ between ranks."""

from __future__ import annotations

from functools import cached_property

from estimator.events import Event, alloc
from estimator.families.base import ParamTensor
from estimator.layouts import (
    master_grad_events,
    master_grad_free_events,
    master_setup_events,
    separate_master_copy,
)
from estimator.parallel.base import (
    RankContext,
    RankEstimate,
    chain,
    compose,
    local_model_states,
    summaries,
)
from estimator.periodic import keep_events
from estimator.simulate import optimizer_step_events, state_events
from estimator.timeline import Summary, summarize


class ReplicatedParameters:
    """The setup and summaries every rank of a replicated-parameter strategy shares."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self._summarised: tuple[list[ParamTensor], tuple[Summary, Summary] | None] | None = None

    @cached_property
    def setup(self):  # noqa: ANN201 - a Program
        return keep_events(self.ctx.setup, lambda e: e.role != "optimizer_state")

    @cached_property
    def body_first(self) -> list[Summary]:
        return [chain(summaries(self.ctx.first_body))]

    @cached_property
    def body_steady(self) -> list[Summary]:
        return [chain(summaries(self.ctx.steady_body))]

    def tail(self, first: bool) -> list[Summary]:
        return self.ctx.shared(f"tail_{first}", lambda: [chain(summaries(
            self.ctx.first_tail if first else self.ctx.steady_tail))])

    @cached_property
    def parameter_bytes(self) -> int:
        return sum(p.numel for p in self.ctx.params) * self.ctx.plan.parameter_bytes

    @cached_property
    def saved_activation_bytes(self) -> int:
        return self.ctx.base.saved_activation_bytes

    def bucket_events(self, buckets: list[int]) -> list[Event]:
        """DDP's flat bucket buffers, made at construction, as one summed event per role (all ranks alike)."""
        def make() -> list[Event]:
            made = self.ctx.round([alloc(f"ddp.bucket.{i}", "temporary", b, "setup") for i, b in enumerate(buckets)])
            return [alloc("ddp.buckets", "temporary", sum(e.nbytes for e in made), "setup")] if made else []

        return self.ctx.shared(f"buckets{len(buckets)}", make)

    def optimizer(self, local: list[ParamTensor], first: bool) -> Summary:
        """``optimizer.step()`` over the rank's partition (fp32 master gradients made first, layouts.py): summarised
        from the partition's shapes under foreach and fused (``fsdp_own.replicated_optimizer_summaries``), else
        from its events."""
        from estimator.parallel.fsdp_own import replicated_optimizer_summaries

        if self._summarised is None or self._summarised[0] is not local:  # the first and steady step of one rank
            self._summarised = (local, replicated_optimizer_summaries(self.ctx, local))
        summarised = self._summarised[1]
        if summarised is not None:
            return summarised[0 if first else 1]
        return self.optimizer_events_summary(local, first)

    def optimizer_events_summary(self, local: list[ParamTensor], first: bool) -> Summary:
        """:meth:`optimizer` from the events themselves (the for-loop implementation; the tests' reference)."""
        c = self.ctx
        to_master = master_grad_events(local) if separate_master_copy(c.config) else []
        return summarize(c.round(to_master + optimizer_step_events(c.spec, local, c.config, c.impl, c.step_bytes,
                                                                   first=first)))

    def master_frees(self, local: list[ParamTensor]) -> list[Summary]:
        """``zero_grad`` of the rank's fp32 master gradients (none without master weights)."""
        c = self.ctx
        return [summarize(c.round(master_grad_free_events(local)))] if separate_master_copy(c.config) else []

    def rank(self, strategy: str, rank: int, local: list[ParamTensor], buckets: list[int], gradients: int,
             body: tuple[list[Summary], list[Summary]] | None = None,
             tail: tuple[list[Summary], list[Summary]] | None = None) -> RankEstimate:
        """One rank stepping ``local``, with ``buckets`` (DDP's flat gradient buffers) made at construction."""
        c = self.ctx
        extra = self.bucket_events(buckets)
        if separate_master_copy(c.config):
            extra = extra + c.round(master_setup_events(local))
        if c.spec.state_init == "constructor":
            extra = extra + c.round(state_events(c.spec, local, c.config, "setup", c.step_bytes))
        body_first, body_steady = body or (self.body_first, self.body_steady)
        tail_first, tail_steady = tail or (self.tail(True), self.tail(False))
        step = compose(c, extra, self.setup,
                       [*body_first, self.optimizer(local, True), *tail_first, *self.master_frees(local)],
                       [*body_steady, self.optimizer(local, False), *tail_steady, *self.master_frees(local)])
        state, step_tensors = local_model_states(c, local)
        return RankEstimate(strategy, c.world_size, rank, self.parameter_bytes, gradients, state, step_tensors,
                            step.saved_activation_bytes, sum(buckets), step)
