"""The public analytic API: a config in, an :class:`Estimate` out. Never imports torch."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from estimator.accumulation import global_batch, scale_flops
from estimator.config import Config
from estimator.families.base import BatchInForce, FlopCount, ParamTensor, get_family
from estimator.nogc import without_gc
from estimator.optimizers import get_optimizer
from estimator.periodic import program_length, role_bytes
from estimator.precision import precision_plan
from estimator.simulate import (
    STEP_TENSOR_BYTES,
    SimulatedStep,
    _is_saved,
    resolve_implementation,
    round_size,
    simulate,
    state_bytes,
    step_shape,
)

ROUNDING_EVENT_LIMIT = 200_000
"""The most events of a steady step replayed (twice) to attribute CUDA's rounding per role."""


@dataclass(frozen=True)
class MemoryTerms:
    """The seed's first-order memory terms (section 6), in bytes, and their sum.

    ``activations`` is what the family's forward saves for backward, each tensor at its real dtype
    (transformers and traced modules: exactly ``saved_activations``); for the seed's MLP it is the
    seed's own ``B·D·num_layers`` term, so that the seed's example stays 64 + ... = 496 bytes.
    """

    parameters: int
    activations: int
    gradients: int
    optimizer_state: int
    optimizer_step_tensors: int  # torch's per-parameter 'step' scalars, kept apart from the seed's sum

    @property
    def total(self) -> int:
        return self.parameters + self.activations + self.gradients + self.optimizer_state


@dataclass(frozen=True)
class Estimate:
    """Everything the analytic path computes for one config."""

    config: Config
    device: str
    implementation: str
    parameters: int
    trainable_parameters: int
    memory: MemoryTerms
    flops: FlopCount
    step: SimulatedStep
    batch: BatchInForce  # the batch (and sequence length) the step really uses

    @cached_property
    def saved_activations(self) -> int:
        """Bytes saved for backward, exact (see saved_activation_bytes); computed when first asked: the
        tables of ``estimate`` do not print it, and unless the step is kept as periodic programs it is a
        second pass over the family's forward and backward events (``_saved_bytes``)."""
        return self.step.saved_activation_bytes if self.device == "cpu" else _saved_bytes(self.config, self.step)

    @property
    def peak_bytes(self) -> int:
        return self.step.steady_peak.bytes

    @property
    def first_step_peak_bytes(self) -> int:
        return self.step.first_peak.bytes

    @property
    def saved_activation_bytes(self) -> int:
        """Bytes autograd saves for backward in one step (what saved_tensors_hooks sees), from the events.

        Exact tensor bytes on every device (not rounded to CUDA's 512-byte blocks, like the
        measurement's figure). Equal to ``memory.activations`` except for the seed's MLP, whose
        first-order term is the seed's ``B·D·num_layers``: autograd also keeps the head's output
        (and, under autocast, the 16-bit copies of the weights and of the input).
        """
        return self.saved_activations

    @property
    def input_bytes(self) -> int:
        return self.step.input_bytes  # a compressed step reads it off its programs, without flattening

    def to_json(self) -> dict[str, Any]:
        """The JSON object printed by ``estimate --json`` (bytes and FLOPs exact integers)."""
        m, f = self.memory, self.flops
        return {
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "memory": {
                "parameters": m.parameters,
                "activations": m.activations,
                "gradients": m.gradients,
                "optimizer_state": m.optimizer_state,
                "total": m.total,
                "optimizer_step_tensors": m.optimizer_step_tensors,
            },
            "flops": {
                "per_step": f.per_step,
                "forward": f.forward,
                "backward": f.backward,
                "matmul": f.matmul,
                "matmul_forward": f.matmul_forward,
                "attention": f.attention,
                "matmul_optimizer": f.optimizer_matmul,
                "rule_tokens": f.tokens,
                "rule_parameters": f.rule_parameters,
            },
            "peak_bytes": self.peak_bytes,
            "first_step_peak_bytes": self.first_step_peak_bytes,
            "peak_phase": self.step.steady_peak.phase,
            "first_step_peak_phase": self.step.first_peak.phase,
            "peak_by_role": self.step.steady_peak.by_role,
            "saved_activations": self.saved_activation_bytes,
            "inputs": self.input_bytes,
            "optimizer": self.config.optimizer.name,
            "precision": self.config.training.precision,
            "master_weights": self.config.training.master_weights,
            "grad_accum_steps": self.config.training.grad_accum_steps,
            "global_batch": global_batch(self.config, self.batch.batch_size),
            "device": self.device,
            "implementation": self.implementation,
            "config": self.config_in_force(),
            **_family_details(self.config),
        }

    @property
    def step_tensors_on_device(self) -> bool:
        """torch keeps the 'step' scalars on the device on the CPU, or on CUDA with the fused kernel."""
        return self.device == "cpu" or self.implementation == "fused"

    def block_rounding_at_peak(self) -> dict[str, int] | None:
        """Per role, the bytes CUDA's 512-byte rounding adds to the tensors live at the steady peak.

        Empty on the CPU. The exact (unrounded) step is the CPU's event list with the same optimizer
        kernel, less the 'step' scalars that CUDA keeps on the host; both lists are replayed in
        lockstep and compared at the rounded peak (the first event where the maximum is reached).
        None if the two lists do not line up, or if the step has more than :data:`ROUNDING_EVENT_LIMIT`
        events (a model of many layers kept as periodic programs is not flattened for this): then the
        rounding cannot be attributed and the report says its figures include it.
        """
        if self.device != "cuda":
            return {}
        if "_rounding" not in self.__dict__:  # computed once per estimate (the report asks twice)
            object.__setattr__(self, "_rounding", self._block_rounding())
        return self.__dict__["_rounding"]

    def _block_rounding(self) -> dict[str, int] | None:
        if getattr(self.step, "exact_programs", None) is not None:  # kept as periodic programs: no flattening
            return self.step.rounding_at(self.step.steady_peak.index)
        programs = getattr(self.step, "programs", None)  # a step kept as periodic programs: flatten it only
        if programs is not None and program_length(programs[2]) > ROUNDING_EVENT_LIMIT:  # if that is cheap
            return None
        opt = self.config.optimizer.model_copy(update={"implementation": self.implementation})
        exact_step = simulate(self.config.model_copy(update={"optimizer": opt}), "cpu")
        host = not self.step_tensors_on_device

        def on_device(name: str, role: str) -> bool:
            return not (host and (name == "step_increment" or (role == "optimizer_state" and name.endswith(".step"))))

        rounded, exact = self.step.steady_step, [e for e in exact_step.steady_step if on_device(e.name, e.role)]
        if len(rounded) != len(exact) or any(not _same_tensor(a, b) for a, b in zip(rounded, exact, strict=False)):
            return None
        live_r = _roles((t.role, t.nbytes) for t in self.step.live_before_steady.values())
        live_e = _roles((t.role, t.nbytes) for n, t in exact_step.live_before_steady.items() if on_device(n, t.role))
        best, at = sum(live_r.values()), (dict(live_r), dict(live_e))
        current = best
        for r, e in zip(rounded, exact, strict=True):
            live_r[r.role] = live_r.get(r.role, 0) + r.nbytes
            live_e[e.role] = live_e.get(e.role, 0) + e.nbytes
            current += r.nbytes
            if current > best:
                best, at = current, (dict(live_r), dict(live_e))
        return {role: n - at[1].get(role, 0) for role, n in at[0].items() if n - at[1].get(role, 0)}

    def config_in_force(self) -> dict[str, Any]:
        """The config as JSON with the values the step really used: a transformer's ``seq_len``
        resolved (``max_seq_len`` when not given), a module's batch read off its input shapes."""
        data = self.config.model_dump(mode="json")
        data["training"]["batch_size"] = self.batch.batch_size
        if self.batch.seq_len is not None:
            data["training"]["seq_len"] = self.batch.seq_len
        return data


@without_gc
def estimate(config: Config | None = None, device: str | None = None) -> Estimate:
    """Memory, FLOPs and the simulated peak of one training step of ``config``.

    ``device`` ("cpu" or "cuda") overrides ``config.device``: it decides the CUDA allocator's
    512-byte rounding, where torch keeps the 'step' scalars, and torch.optim's default kernel.
    """
    config = config or Config()
    target = device or config.device
    family = get_family(config.model.family)
    step = simulate(config, target)
    plan = precision_plan(config.training.precision)
    spec = get_optimizer(config.optimizer.name)
    params = family.parameters(config.model)
    trainable = [p for p in params if p.trainable]
    n_params = sum(p.numel for p in params)
    n_trainable = sum(p.numel for p in trainable)
    memory = MemoryTerms(
        parameters=n_params * plan.parameter_bytes,
        activations=_activation_bytes(family, config),
        gradients=n_trainable * plan.gradient_bytes,
        optimizer_state=state_bytes(spec, trainable, config),
        optimizer_step_tensors=STEP_TENSOR_BYTES * len(trainable) if spec.step_tensor else 0,
    )
    return Estimate(
        config=config,
        device=target,
        implementation=resolve_implementation(config, target),
        parameters=n_params,
        trainable_parameters=n_trainable,
        memory=memory,
        flops=_with_optimizer_flops(scale_flops(family.flops(config.model, config.training),
                                                config.training.grad_accum_steps), spec, trainable),
        step=step,
        batch=_batch_in_force(family, config),
    )


def _same_tensor(rounded: Any, exact: Any) -> bool:
    """``rounded`` is ``exact`` rounded up to CUDA's 512-byte blocks (same role, phase and direction)."""
    return (rounded.role, rounded.phase) == (exact.role, exact.phase) and rounded.nbytes == round_size(exact.nbytes)


def _roles(pairs: Any) -> dict[str, int]:
    totals: dict[str, int] = {}
    for role, n in pairs:
        totals[role] = totals.get(role, 0) + n
    return totals


def _activation_bytes(family: Any, config: Config) -> int:
    """The family's activation term; a family without ``activation_bytes`` counts its elements at
    the activation dtype's size."""
    if hasattr(family, "activation_bytes"):
        return int(family.activation_bytes(config.model, config.training, step_shape(config)))
    return family.activation_elements(config.model, config.training) * step_shape(config).activation_bytes


def _batch_in_force(family: Any, config: Config) -> BatchInForce:
    """The batch the step uses; a family without ``batch_in_force`` uses the training section as given."""
    if hasattr(family, "batch_in_force"):
        return family.batch_in_force(config.model, config.training)
    seq = config.training.seq_len
    return BatchInForce(config.training.batch_size, seq, "training.batch_size", "training.seq_len" if seq else None)


def _family_details(config: Config) -> dict[str, Any]:
    """Figures a family adds to the JSON (the MoE family: active parameters and the routing assumption)."""
    details = getattr(get_family(config.model.family), "details", None)
    return {"model_details": details(config.model, config.training)} if details is not None else {}


def _saved_bytes(config: Config, step: Any = None) -> int:
    """Bytes saved for backward from the family's own (unrounded) forward and loss events.

    The forward and loss events do not depend on the device, nor on the optimizer: a compressed CUDA
    step's unrounded programs hold them (layers that repeat are summed once, periodic.py); otherwise
    they are the family's forward-backward events alone, without simulating a whole step again.
    """
    exact = getattr(step, "exact_programs", None)
    if exact is not None:
        return role_bytes(exact[2], _is_saved)
    body = get_family(config.model.family).forward_backward_events(config.model, config.training, step_shape(config))
    return sum(e.nbytes for e in body if _is_saved(e))


def _with_optimizer_flops(flops: FlopCount, spec: Any, params: list[ParamTensor]) -> FlopCount:
    """Add the matmuls of ``optimizer.step()`` (Adafactor has some), as FlopCounterMode sees a step."""
    extra = sum(spec.matmul_flops(p) for p in params)
    return replace(flops, matmul=flops.matmul + extra, optimizer_matmul=extra)


def compare(config: Config, optimizers: list[str], device: str | None = None) -> list[Estimate]:
    """The same step under each optimizer in ``optimizers`` (names validated like the config's)."""
    from estimator.loader import validate_config

    results = []
    for name in optimizers:
        data = config.model_dump(mode="json")
        data["optimizer"] = {"name": name, "implementation": config.optimizer.implementation}
        results.append(estimate(validate_config(data), device))
    return results


def parameter_tensors(config: Config) -> list[ParamTensor]:
    """The parameter tensors of the configured model (name, shape, trainable)."""
    return get_family(config.model.family).parameters(config.model)
