"""``verify`` for the MoE family: a deterministic real step, the tokens each expert received, and the
estimate recomputed with that routing (the estimate's routing is an assumption; docs/moe.md).

The model is built from a fixed seed and the batch from a fixed generator, so the profiled
(uninstrumented) run, the instrumented run and the FLOP-counting step route the same tokens the
same way; the first built model's routing history (one entry per step) is what the peaks measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from estimator.api import Estimate, estimate
from estimator.config import Config
from estimator.measure.models import StepParts

SEED = 0


class _Builder:
    """Builds the configured MoE model (same weights every time) and keeps each model it built."""

    def __init__(self, config: Config, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self.models: list[Any] = []

    def __call__(self) -> Any:
        from estimator.measure.moe import build_moe

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = build_moe(self.config.model, self.device, self.dtype,
                              activation_checkpointing=self.config.training.activation_checkpointing)
        self.models.append(model)
        return model


def moe_step_parts(config: Config, device: torch.device, dtype: torch.dtype,
                   autocast: torch.dtype | None) -> StepParts:
    """Model builder (seeded, recording), a fixed batch of token ids, the model's own loss."""
    model = config.model
    b = config.training.batch_size
    seq = config.training.seq_len or model.max_seq_len

    def make_tokens() -> tuple[tuple[Tensor, ...], Tensor]:
        gen = torch.Generator().manual_seed(SEED)
        idx = torch.randint(0, model.vocab_size, (b, seq), generator=gen).to(device)
        targets = torch.randint(0, model.vocab_size, (b, seq), generator=gen).to(device)
        return (idx,), idx if model.labels_from_inputs else targets

    return StepParts(_Builder(config, device, dtype), make_tokens, None, autocast)


@dataclass(frozen=True)
class RoutingCheck:
    """What the real step's router did, and the estimate under the assumed and the measured routing."""

    assumed: Estimate  # the estimate as configured (balanced routing by default)
    first_step: list[list[int]]  # tokens per expert, per MoE layer, in the first step
    steady_step: list[list[int]]  # ... in the steady (second) step, which the re-estimate uses

    def to_json(self) -> dict[str, Any]:
        a = self.assumed
        return {"assumed_routing": a.config.model.routing.mode,
                "assumed_peak_bytes": a.peak_bytes, "assumed_first_step_peak_bytes": a.first_step_peak_bytes,
                "assumed_saved_activations": a.saved_activation_bytes,
                "tokens_per_expert_first_step": self.first_step, "tokens_per_expert_steady_step": self.steady_step}


def remeasured(config: Config, assumed: Estimate, parts: StepParts, device_kind: str) -> tuple[Estimate, RoutingCheck]:
    """The estimate redone with the steady step's measured tokens per expert, and the routing record."""
    builder = parts.build_model
    history = builder.models[0].routing_history() if isinstance(builder, _Builder) and builder.models else []
    if len(history) < 2:
        return assumed, RoutingCheck(assumed, [], [])
    first, steady = history[0], history[1]
    data = config.model_dump(mode="json")
    data["model"]["routing"] = {"mode": "measured", "tokens_per_expert": steady}
    measured = estimate(Config.model_validate(data), device_kind)
    return measured, RoutingCheck(assumed, first, steady)


def routing_note(check: RoutingCheck, measured_peak: int) -> str:
    """One line for verify's notes: the measured routing and how far the assumption was."""
    a = check.assumed
    busiest = max((max(c) for c in check.steady_step), default=0)
    even = sum(check.steady_step[0]) / len(check.steady_step[0]) if check.steady_step else 0
    ratio = a.peak_bytes / measured_peak if measured_peak else float("nan")
    return (f"MoE routing: the step's busiest expert got {busiest} tokens (balanced: {even:g}); the estimate above "
            f"uses the measured tokens per expert. With the assumed {a.config.model.routing.mode} routing the "
            f"steady peak would be {a.peak_bytes:,} B ({ratio:.4f}x the measured peak).")
