"""``estimator verify``: run the configured step for real and put the estimate beside the measurement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from estimator.api import Estimate, estimate
from estimator.comparison import Row
from estimator.config import Config
from estimator.errors import EstimatorError
from estimator.measure.models import model_run, optimizer_factory, step_parts
from estimator.measure.step import Measurement, free_bytes, measure_training_step, resolve_device
from estimator.units import human_bytes

SAFETY_FRACTION = 0.8  # never plan to use more than this share of what the device has free
TRACKING_OVERHEAD = 64 << 20  # the Python side of a CPU run: interpreter, tracker records, profiler


@dataclass(frozen=True)
class Verification:
    """An estimate, a measurement of the same step, and the figures compared."""

    estimate: Estimate
    measurement: Measurement
    rows: list[Row]
    impl: str
    routing: Any = None  # MoE: estimator.measure.moe_verify.RoutingCheck (the measured tokens per expert)
    model_run: str | None = None  # the torch model built and run (estimator.measure.models.model_run)

    def failures(self, tolerance: float) -> list[Row]:
        return [row for row in self.rows if not row.within(tolerance)]

    def to_json(self) -> dict[str, Any]:
        """The estimate object plus ``measured`` (integers) and ``device``."""
        m = self.measurement
        real_first, real_steady = m.real_first_step, m.real_steady_step
        data = self.estimate.to_json()
        data["device"] = m.device
        data["optimizer_impl"] = self.impl
        data["measured"] = {
            "device": m.device,
            "model": self.model_run,
            "method": measurement_method(m),
            "peak_bytes": real_steady.peak_bytes - m.baseline_bytes,
            "first_step_peak_bytes": real_first.peak_bytes - m.baseline_bytes,
            "baseline_bytes": m.baseline_bytes,
            "peak_phase": real_steady.peak_phase,
            "first_step_peak_phase": real_first.peak_phase,
            "parameters": m.parameters,
            "gradients": m.gradients,
            "optimizer_state": m.optimizer_state,
            "optimizer_step_tensors": m.optimizer_step_tensors,
            "activations": m.activations,
            "inputs": m.inputs,
            "flops_matmul": m.flops_matmul,
            "phase_peaks": real_steady.phase_peaks,
            "cuda_reserved_bytes": m.cuda_reserved_bytes,
            "cuda_context_bytes": m.cuda_context_bytes,
        }
        if m.uninstrumented is not None:
            u = m.uninstrumented
            data["measured"]["allocator"] = {  # the CPU's max_memory_allocated: every block, op outputs or not
                "peak_bytes": u.allocator_steady_peak,
                "first_step_peak_bytes": u.allocator_first_peak,
                "not_op_output_bytes": u.not_op_output_bytes,
            }
            data["measured"]["instrumented"] = {  # the live-tensor tracker's step (a dispatch mode)
                "peak_bytes": m.steady_step.peak_bytes,
                "first_step_peak_bytes": m.first_step.peak_bytes,
                "peak_phase": m.steady_step.peak_phase,
                "phase_peaks": m.steady_step.phase_peaks,
            }
        if self.routing is not None:
            data["moe_routing"] = self.routing.to_json()
        data["comparison"] = {
            row.key: {"estimated": row.estimated, "measured": row.measured, "ratio": row.ratio} for row in self.rows
        }
        return data


def measurement_method(m: Measurement) -> str:
    """Where the compared peaks come from (docs/measurement.md)."""
    if m.uninstrumented is not None:
        return "cpu allocator records (torch.profiler, no dispatch mode): blocks ATen ops returned"
    if m.cuda_context_bytes is not None or m.device.split(":")[0] not in ("cpu", "meta"):
        return "caching allocator (max_memory_allocated per phase)"
    return "live-tensor tracker (a dispatch mode)"


def device_kind(device: torch.device) -> str:
    """The estimate's device model: CUDA's allocator rounding, or exact bytes (CPU and others)."""
    return "cuda" if device.type == "cuda" else "cpu"


def check_fits(est: Estimate, device: torch.device) -> None:
    """Refuse, before allocating anything, a step that would not fit in what the device has free."""
    need = max(est.peak_bytes, est.first_step_peak_bytes)
    refuse_if_too_large(need + (TRACKING_OVERHEAD if device.type == "cpu" else 0), device, "this step")


def refuse_if_too_large(need: int, device: torch.device | str, what: str) -> None:
    """One rule for every real run: use at most ``SAFETY_FRACTION`` of what the device has free."""
    free = free_bytes(device)
    if need > SAFETY_FRACTION * free:
        raise EstimatorError(
            f"verify: {what} needs about {human_bytes(need)} on {device} but only {human_bytes(free)} is free "
            f"(verify uses at most {SAFETY_FRACTION:.0%} of it); reduce training.batch_size or the model"
        )


def run_verify(
    config: Config,
    device_spec: str = "auto",
    impl: str = "torch",
    on_phase: Callable[[str], None] | None = None,
) -> Verification:
    """Estimate, check it fits, run two real steps, and compare."""
    from estimator.measure.flop_formulas import register_sdpa_flops

    register_sdpa_flops()  # FlopCounterMode counts 0 for the CPU's SDPA kernel without it
    device = resolve_device(device_spec)
    est = estimate(config, device_kind(device))
    check_fits(est, device)
    parts = step_parts(config, device)
    make_optimizer = optimizer_factory(config, impl)
    measurement = measure_training_step(
        parts.build_model, parts.make_batch, parts.loss_fn, make_optimizer, device,
        autocast_dtype=parts.autocast_dtype, on_phase=on_phase, uninstrumented=True,
        accum_steps=config.training.grad_accum_steps,
    )
    routing = None
    if config.model.family == "moe":  # re-estimate with the routing the step really had
        from estimator.measure.moe_verify import remeasured

        est, routing = remeasured(config, est, parts, device_kind(device))
    return Verification(est, measurement, compare_rows(est, measurement), impl, routing, model_run(config))


def saved_weight_copies(est: Estimate) -> int:
    """Autocast's 16-bit weight copies autograd keeps for backward: saved tensors the real step counts, which
    the estimate's activations figure leaves out (``simulate._is_cast_in_forward``); 0 without autocast.

    Read off the CPU step (the forward's events do not depend on the device; cached when the estimate was
    for the CPU). A traced model files its casts as activations already, so it is not simulated again.
    """
    from estimator.precision import precision_plan
    from estimator.simulate import simulate

    if not precision_plan(est.config.training.precision).autocast or est.config.model.family in ("module", "hf"):
        return 0
    return getattr(simulate(est.config, "cpu"), "saved_copy_bytes", 0)


def compare_rows(est: Estimate, m: Measurement) -> list[Row]:
    """The figures both sides know, in the order the report shows them."""
    mem = est.memory
    step_tensors = sum(t.nbytes for name, t in est.step.live_before_steady.items() if name.endswith(".step"))
    return [
        Row("parameters", "parameters", mem.parameters, m.parameters),
        Row("gradients", "gradients", mem.gradients, m.gradients),
        Row("optimizer_state", "optimizer state", mem.optimizer_state, m.optimizer_state),
        Row("optimizer_step_tensors", "'step' tensors on the device", step_tensors, m.optimizer_step_tensors),
        Row("activations", "saved for backward", est.saved_activation_bytes + saved_weight_copies(est), m.activations),
        Row("inputs", "inputs + targets", est.input_bytes, m.inputs),
        # On CUDA the cuBLAS workspaces, allocated by the warm-up before the model exists, sit under
        # every figure of max_memory_allocated; they are not the step's, so they are taken out.
        # On the CPU the peaks are the uninstrumented step's (the tracker's dispatch mode changes how
        # autograd sums gradients); the tracker's own peaks are reported beside them, not compared.
        Row("first_step_peak_bytes", "first-step peak", est.first_step_peak_bytes,
            m.real_first_step.peak_bytes - m.baseline_bytes),
        Row("peak_bytes", "steady-step peak", est.peak_bytes, m.real_steady_step.peak_bytes - m.baseline_bytes),
        Row("flops_matmul", "matmul FLOPs", est.flops.matmul, m.flops_matmul),
    ]
