"""Any Hugging Face architecture: the real ``transformers`` model, traced on fake tensors.

The ``hf`` family holds a ``config.json`` (as a mapping) and which head to train. It builds the real
model with transformers' Auto class for that head (``from_config``: random init, no download) and
hands it to the module family's trace (``estimator.families.module``; docs/module.md), so every
figure -- parameters, what autograd saves, the peak, FlopCounterMode's matmuls -- is that of the
model a user of transformers runs. docs/hf.md says when this path is taken (a ``model_type`` the
analytic families do not cover, or ``engine: transformers``) and how it agrees with the analytic one.

This file is the pure-Python half (config, batch, FLOP rule): ``import estimator`` imports no torch
and no transformers; the trace imports both (``estimator/measure/hf_model.py``).

The step traced is the one transformers' ``Trainer`` runs: ``loss = model(**batch, labels=...).loss``
and ``loss.backward()``; the output object (its logits) is dropped before backward (Trainer's
``compute_loss`` returns the loss only). Labels: the token ids themselves for a language model
(causal LM: transformers shifts them inside its loss, ``ForCausalLMLoss``), class ids for a
classifier.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any, Literal

from pydantic import Field, field_validator

from estimator.config import StrictModel, TrainingConfig
from estimator.errors import EstimatorError
from estimator.events import Event
from estimator.families.base import BatchInForce, FlopCount, ParamTensor, StepShape, register_family

HFTask = Literal["auto", "causal_lm", "masked_lm", "seq2seq_lm", "sequence_classification", "image_classification"]
TASKS = ("causal_lm", "masked_lm", "seq2seq_lm", "sequence_classification", "image_classification")
#: the transformers Auto class that builds each head
AUTO_CLASSES: dict[str, str] = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
}
#: class-name endings of ``config.json``'s ``architectures`` and the head they mean (first match wins)
_ARCHITECTURE_SUFFIXES = (
    ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"), ("ForMaskedLM", "masked_lm"),
    ("ForSeq2SeqLM", "seq2seq_lm"), ("ForConditionalGeneration", "seq2seq_lm"),
    ("ForSequenceClassification", "sequence_classification"), ("ForImageClassification", "image_classification"),
)
#: where config.json files keep the longest sequence, in the order looked at
_SEQ_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
HF_FACTORY = "estimator.measure.hf_model:build_step"
INSTALL_HINT = "pip install 'estimator[hf]'"


def _task_of(architecture: str) -> str | None:
    """The head a transformers class name stands for (``GPT2LMHeadModel`` -> ``causal_lm``), or None."""
    return next((task for suffix, task in _ARCHITECTURE_SUFFIXES if architecture.endswith(suffix)), None)


def transformers_installed() -> bool:
    """Whether ``transformers`` can be imported (looked up without importing it)."""
    return importlib.util.find_spec("transformers") is not None


class HFModelConfig(StrictModel):
    """A Hugging Face model built by transformers from its config.json and traced (docs/hf.md)."""

    family: Literal["hf"] = "hf"
    config: dict[str, Any] = Field(description="the config.json's contents (keys given here override the file's)")
    source: str | None = Field(None, description="where the config.json came from (a path or org/name); shown only")
    task: HFTask = Field(
        "auto", description="the head trained: auto (from config.json's architectures) | causal_lm | masked_lm | "
        "seq2seq_lm | sequence_classification | image_classification"
    )

    @field_validator("config")
    @classmethod
    def _has_model_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("model_type"), str) or not value["model_type"]:
            raise ValueError("needs a string 'model_type' (the key every transformers config.json has)")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be plain JSON values ({exc})") from None
        return value

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    def resolved_task(self) -> str:
        """``task``, or for ``auto`` the head config.json's ``architectures`` names, else a guess from its
        keys: an image model (``image_size`` and no ``vocab_size``), an encoder-decoder, or a causal LM."""
        if self.task != "auto":
            return self.task
        for arch in self.config.get("architectures") or []:
            task = _task_of(arch) if isinstance(arch, str) else None
            if task is not None:
                return task
        if "image_size" in self.config and "vocab_size" not in self.config:
            return "image_classification"
        if self.config.get("is_encoder_decoder"):
            return "seq2seq_lm"
        return "causal_lm"

    def describe(self) -> str:
        """The header's model words: ``hf llama (transformers AutoModelForCausalLM), from PATH``."""
        task = self.resolved_task()
        named = [a for a in self.config.get("architectures") or [] if isinstance(a, str) and _task_of(a) == task]
        text = f"hf {self.model_type} (transformers {named[0] if named else AUTO_CLASSES[task]})"
        return text + (f" from {self.source}" if self.source else "")


def _config_int(model: HFModelConfig, key: str, default: int | None = None) -> int | None:
    value = model.config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise EstimatorError(f"model.config.{key}: expected a positive integer, got {value!r}")
    return value


def sequence_length(model: HFModelConfig, batch: TrainingConfig) -> tuple[int, str]:
    """S and where it comes from: ``training.seq_len``, else the config's longest sequence."""
    if batch.seq_len is not None:
        return batch.seq_len, "training.seq_len"
    for key in _SEQ_KEYS:
        if model.config.get(key) is not None:
            return int(_config_int(model, key) or 0), f"model.config.{key}"
    raise EstimatorError(f"training.seq_len: config.json of {model.model_type!r} names no longest sequence "
                         f"({', '.join(_SEQ_KEYS)}); give training.seq_len")


def num_labels(model: HFModelConfig) -> int:
    """Classes of a classifier head: ``num_labels``, else ``id2label``'s size, else transformers' 2."""
    given = _config_int(model, "num_labels")
    if given is not None:
        return given
    labels = model.config.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else 2


def module_section(model: HFModelConfig, batch: TrainingConfig) -> dict[str, Any]:
    """The module-family section that builds and trains this model: the factory, its kwargs, the batch.

    Inputs by head (B = ``training.batch_size``, S the sequence length): token ids ``[B, S]`` in
    ``[0, vocab_size)`` for a language model (the labels are the same ids); plus class ids ``[B]`` for
    a sequence classifier; pixels ``[B, num_channels, image_size, image_size]`` and class ids ``[B]``
    for an image classifier. The loss is the model's own (``loss: sum`` of the scalar it returns,
    which the trace takes as is).
    """
    task = model.resolved_task()
    b = batch.batch_size
    kwargs = {"config": model.config, "task": task,
              "activation_checkpointing": batch.activation_checkpointing == "full"}
    if task == "image_classification":
        if batch.seq_len is not None:
            raise EstimatorError("training.seq_len: an image model has no sequence; remove it")
        size = model.config.get("image_size", 224)
        side = size if isinstance(size, list) and len(size) == 2 else [size, size]
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in side):
            raise EstimatorError(f"model.config.image_size: expected a positive integer, got {size!r}")
        channels = _config_int(model, "num_channels", 3) or 3
        inputs = [{"shape": [b, channels, *side], "dtype": "float32"},
                  {"shape": [b], "dtype": "int64", "high": num_labels(model)}]
    else:
        vocab = _config_int(model, "vocab_size")
        if vocab is None:
            raise EstimatorError(f"model.config.vocab_size: needed for the token ids of a {task} model "
                                 f"({model.model_type!r} keeps it elsewhere?); give model.config.vocab_size")
        seq, _ = sequence_length(model, batch)
        inputs = [{"shape": [b, seq], "dtype": "int64", "high": vocab}]
        if task == "sequence_classification":
            inputs.append({"shape": [b], "dtype": "int64", "high": num_labels(model)})
    return {"family": "module", "module": HF_FACTORY, "kwargs": kwargs, "inputs": inputs, "loss": "sum"}


def module_config(model: HFModelConfig, batch: TrainingConfig) -> Any:
    """:func:`module_section` validated as a ``ModuleConfig``."""
    from estimator.families.module import ModuleConfig

    if not transformers_installed():
        raise EstimatorError(f"model: building the {model.model_type!r} model needs transformers; {INSTALL_HINT}")
    return ModuleConfig.model_validate(module_section(model, batch))


def module_training(batch: TrainingConfig) -> TrainingConfig:
    """The training section the module family accepts: checkpointing is the factory's, S the inputs'."""
    return batch.model_copy(update={"seq_len": None, "activation_checkpointing": "none"})


_PARAMETERS: dict[str, tuple[ParamTensor, ...]] = {}  # model JSON -> parameters (any batch, any precision)


@register_family("hf")
class HFFamily:
    """A transformers model: every figure read off the module family's trace of the real model."""

    name = "hf"
    activation_description = ("what the traced step of the transformers model saves for backward "
                              "(saved_tensors_hooks), its loss's upcast logits included")

    @staticmethod
    def _module() -> Any:
        from estimator.families.base import get_family

        return get_family("module")

    def trace(self, model: HFModelConfig, batch: TrainingConfig) -> Any:
        trace = self._module().trace(module_config(model, batch), module_training(batch))
        key = model.model_dump_json()
        listed = _PARAMETERS.setdefault(key, trace.parameters)
        if listed != trace.parameters:
            lost = [p.name for p, q in zip(listed, trace.parameters, strict=False) if p != q] or ["(the list)"]
            raise EstimatorError(f"model: the traced step of the {model.model_type!r} model gives no gradient to "
                                 f"{', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}, which the parameter list "
                                 "counted as trained; freeze them (requires_grad=False) in a module: config instead")
        return trace

    def parameters(self, model: HFModelConfig) -> list[ParamTensor]:
        """``named_parameters()`` of the built model (a tied head counted once, as torch lists it).

        They do not depend on the batch: a trace of this model answers if there is one; else the model is
        built on the meta device (no trace, no memory) and every parameter that requires a gradient is
        trained -- which the trace then checks (a parameter the step leaves without gradient is an error).
        """
        key = model.model_dump_json()
        if key not in _PARAMETERS:
            if not transformers_installed():
                raise EstimatorError(f"model: building the {model.model_type!r} model needs transformers; "
                                     f"{INSTALL_HINT}")
            from estimator.measure.hf_model import parameter_list

            _PARAMETERS[key] = parameter_list(model.config, model.resolved_task())
        return list(_PARAMETERS[key])

    def activation_elements(self, model: HFModelConfig, batch: TrainingConfig) -> int:
        return self._module().activation_elements(module_config(model, batch), module_training(batch))

    def activation_bytes(self, model: HFModelConfig, batch: TrainingConfig, shape: StepShape) -> int:
        return self._module().activation_bytes(module_config(model, batch), module_training(batch), shape)

    def batch_in_force(self, model: HFModelConfig, batch: TrainingConfig) -> BatchInForce:
        """B is ``training.batch_size``; S ``training.seq_len`` or the config's longest sequence."""
        if model.resolved_task() == "image_classification":
            return BatchInForce(batch.batch_size, None, "training.batch_size")
        seq, source = sequence_length(model, batch)
        return BatchInForce(batch.batch_size, seq, "training.batch_size", source)

    def flops(self, model: HFModelConfig, batch: TrainingConfig) -> FlopCount:
        """6·N·T with T = B·S tokens (B samples for an image model) and N the parameters the forward
        reads less those used only through lookups (Kaplan et al. 2020, Table 1); ``matmul`` is
        FlopCounterMode's count of the traced step."""
        t = self.trace(model, batch)
        bif = self.batch_in_force(model, batch)
        tokens = bif.batch_size * (bif.seq_len or 1)
        work = tokens * t.flop_parameters
        return FlopCount(forward=2 * work, backward=4 * work, matmul=t.matmul, matmul_forward=t.matmul_forward,
                         tokens=tokens, rule_parameters=t.flop_parameters)

    def input_events(self, model: HFModelConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        return self._module().input_events(module_config(model, batch), module_training(batch), shape)

    def forward_backward_events(self, model: HFModelConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        return self._module().forward_backward_events(module_config(model, batch), module_training(batch), shape)

    def end_of_step_events(self, model: HFModelConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        return self._module().end_of_step_events(module_config(model, batch), module_training(batch), shape)
