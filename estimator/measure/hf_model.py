"""The torch side of the ``hf`` family: build the real transformers model for one training step.

:func:`build_step` is the module family's factory (``estimator.families.hf.module_section`` names
it): ``AutoConfig.for_model(model_type, **config)`` then the head's Auto class ``from_config``
(random init, nothing downloaded), in float32 whatever ``dtype`` config.json names (the trace and
``verify`` convert it to the precision, as ``model.to(dtype)`` does), in training mode, with
transformers' own activation checkpointing when asked (``activation_checkpointing_enable``, non-
reentrant, its default). The wrapper's ``forward`` is the step transformers' ``Trainer`` runs:
``model(**inputs, labels=labels).loss``, the output object dropped before backward.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from estimator.errors import EstimatorError
from estimator.families.base import ParamTensor
from estimator.families.hf import AUTO_CLASSES, INSTALL_HINT


class HFTrainingStep(nn.Module):
    """``model(inputs, labels=...).loss``: the scalar loss transformers computes for its head.

    Language models take their token ids as labels (a causal LM shifts them inside its loss); a
    classifier takes the class ids given as the second input.
    """

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, first: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.task == "image_classification":
            out = self.model(pixel_values=first, labels=labels)
        elif self.task == "sequence_classification":
            out = self.model(input_ids=first, labels=labels)
        else:
            out = self.model(input_ids=first, labels=first)
        loss = out.loss
        del out  # Trainer.compute_loss returns the loss only: the logits are not held through backward
        return loss


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers logs warnings while building a random model (unused config keys, init notes)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def hf_config_object(config: dict[str, Any]) -> Any:
    """transformers' config class for ``config['model_type']``, filled with the other keys."""
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise EstimatorError(f"model: building a Hugging Face model needs transformers ({exc}); "
                             f"{INSTALL_HINT}") from None
    values = dict(config)
    model_type = values.pop("model_type")
    for key in ("transformers_version", "_name_or_path"):
        values.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as exc:
        raise EstimatorError(f"model.config.model_type: transformers does not know {model_type!r} "
                             f"({str(exc).splitlines()[0][:200]})") from None


def build_model(config: dict[str, Any], task: str) -> nn.Module:
    """The head's Auto class ``from_config`` in float32, training mode; one-line errors."""
    import transformers

    cfg = hf_config_object(config)
    auto = getattr(transformers, AUTO_CLASSES[task])
    model_type = config["model_type"]
    with _quiet_transformers():
        try:
            model = auto.from_config(cfg, dtype=torch.float32)
        except ValueError as exc:
            text = str(exc).splitlines()[0][:200]
            if "Unrecognized configuration class" in text:
                raise EstimatorError(f"model.task: transformers has no {AUTO_CLASSES[task]} for model_type "
                                     f"{model_type!r}; set model.task (one of {', '.join(AUTO_CLASSES)})") from None
            raise EstimatorError(f"model.config: transformers refused the {model_type!r} config: {text}") from None
    model.train()
    return model


def build_step(config: dict[str, Any], task: str, activation_checkpointing: bool = False) -> nn.Module:
    """The module family's factory for an ``hf`` model: the model and its loss, as Trainer runs them."""
    model = build_model(config, task)
    if activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise EstimatorError(f"training.activation_checkpointing: transformers' {type(model).__name__} "
                                 "does not support activation checkpointing")
        with _quiet_transformers():
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers < 5.2x
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return HFTrainingStep(model, task)


def parameter_list(config: dict[str, Any], task: str) -> tuple[ParamTensor, ...]:
    """``named_parameters()`` of the model built on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        model = build_model(config, task)
    return tuple(ParamTensor(f"model.{name}", tuple(p.shape), p.requires_grad)
                 for name, p in model.named_parameters())


def model_class_name(config: dict[str, Any], task: str) -> str:
    """The transformers class the Auto class picks for ``config`` (for the verify header)."""
    import transformers
    from transformers.models.auto.auto_factory import _get_model_class

    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        return _get_model_class(hf_config_object(config), auto._model_mapping).__name__
    except Exception:  # a private helper: fall back to the Auto class's name
        return AUTO_CLASSES[task]
