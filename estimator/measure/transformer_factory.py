"""A module factory for the presets: ``estimator.measure.transformer_factory:preset_model``.

So the project's own transformer (``estimator.measure.transformer``) can be given to the module
family like any user model -- ``kwargs: {name: llama-2-7b, num_layers: 4}`` -- which is how
``benchmarks/trace_llama.py`` traces a 7B model on the meta device.
"""

from __future__ import annotations

from typing import Any

import torch

from estimator.families.transformer import TransformerConfig
from estimator.measure.transformer import Transformer, build_transformer
from estimator.presets import get_preset


def preset_model(
    name: str, device: torch.device | str = "cpu", activation_checkpointing: str = "none", **overrides: Any
) -> Transformer:
    """The preset's model, ``overrides`` replacing its config fields; returns logits (B, S, V).

    ``activation_checkpointing="full"`` wraps each block in ``torch.utils.checkpoint`` inside the
    module, as a user's own model would.
    """
    cfg = TransformerConfig(**{**get_preset(name).values, **overrides})
    return build_transformer(cfg, device, activation_checkpointing=activation_checkpointing)
