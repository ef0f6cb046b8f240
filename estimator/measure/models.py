"""From a validated config to the torch pieces of a real step: model, batch, loss and optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from estimator.config import Config
from estimator.errors import EstimatorError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


@dataclass
class StepParts:
    """What ``measure_training_step`` needs for one config."""

    build_model: Callable[[], nn.Module]
    make_batch: Callable[[], tuple[tuple[Tensor, ...], Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None
    autocast_dtype: torch.dtype | None


def parameter_dtype(config: Config) -> torch.dtype:
    """The dtype the model is built in (fp32 under autocast)."""
    return TORCH_DTYPES.get(config.training.precision, torch.float32)


def step_parts(config: Config, device: torch.device) -> StepParts:
    """The model builder, batch maker and loss of the configured family on ``device``."""
    dtype = parameter_dtype(config)
    autocast = AUTOCAST_DTYPES.get(config.training.precision)
    model = config.model
    b = config.training.batch_size
    if model.family == "mlp":
        from estimator.measure.mlp import build_cruncher

        def make_mlp_batch() -> tuple[tuple[Tensor, ...], Tensor]:
            x = torch.randn(b, model.dim, device=device, dtype=dtype)
            y = torch.arange(4, 4 + b, device=device, dtype=dtype)  # the seed's y = [4., 5.] for B=2
            return (x,), y

        return StepParts(lambda: build_cruncher(model.dim, model.num_layers, device, dtype), make_mlp_batch,
                         F.mse_loss, autocast)
    if model.family == "transformer":
        from estimator.measure.transformer import build_transformer

        seq = config.training.seq_len or model.max_seq_len

        def make_tokens() -> tuple[tuple[Tensor, ...], Tensor]:
            idx = torch.randint(0, model.vocab_size, (b, seq), device=device)
            if model.labels_from_inputs:  # transformers' causal LM: the labels are the ids, shifted in the loss
                return (idx,), idx
            targets = torch.randint(0, model.vocab_size, (b, seq), device=device)
            return (idx,), targets

        return StepParts(
            lambda: build_transformer(model, device, dtype,
                                      activation_checkpointing=config.training.activation_checkpointing),
            make_tokens, None, autocast)
    if model.family == "moe":
        from estimator.measure.moe_verify import moe_step_parts

        return moe_step_parts(config, device, dtype, autocast)
    if model.family == "hf":  # the real transformers model, as the estimate traced it (docs/hf.md)
        from estimator.families.hf import module_config, module_training
        from estimator.measure.module_parts import module_step_parts

        as_module = config.model_copy(update={"model": module_config(model, config.training),
                                              "training": module_training(config.training)})
        return module_step_parts(as_module, device, dtype, autocast)
    if model.family == "module":
        from estimator.measure.module_parts import module_step_parts

        return module_step_parts(config, device, dtype, autocast)
    raise EstimatorError(f"model.family: verify cannot build {model.family!r} models")


def model_run(config: Config) -> str:
    """Which torch model ``verify`` builds for ``config``, in words (the header and ``measured.model``).

    An ``hf`` model is transformers' own class (docs/hf.md); the analytic families run the project's
    re-implementations, whose figures the estimate models.
    """
    model = config.model
    if model.family == "hf":
        import transformers

        from estimator.families.hf import module_config
        from estimator.measure.hf_model import model_class_name

        kwargs = module_config(model, config.training).kwargs
        return f"transformers {transformers.__version__} {model_class_name(kwargs['config'], kwargs['task'])}"
    if model.family == "module":
        return f"{model.module}(**kwargs)"
    return {"mlp": "estimator.measure.mlp (the seed's Cruncher)",
            "transformer": "estimator.measure.transformer (the project's decoder-only transformer)",
            "moe": "estimator.measure.moe (the project's MoE transformer)"}.get(model.family, model.family)


def optimizer_factory(config: Config, impl: str = "torch") -> Callable[[Iterable[nn.Parameter]], Any]:
    """A function that makes the configured optimizer: torch.optim, or the seed's textbook classes."""
    opt = config.optimizer
    name = opt.name
    if impl == "textbook":
        from estimator.measure.textbook import TEXTBOOK

        if name not in TEXTBOOK:
            raise EstimatorError(f"--impl textbook: no textbook {name!r}; textbook optimizers: {', '.join(TEXTBOOK)}")
        cls = TEXTBOOK[name]
        kwargs = {"lr": opt.option("lr")}
        if name in ("momentum",):
            kwargs.update(momentum=opt.option("momentum"), nesterov=opt.nesterov)
        return lambda params: cls(params, **kwargs)
    kwargs = torch_optimizer_kwargs(config)
    cls = torch_optimizer_class(name)
    if config.training.master_weights:  # 16-bit model, fp32 masters stepped by the optimizer (layouts.py)
        from estimator.measure.master import with_master_weights

        return with_master_weights(lambda params: cls(params, **kwargs))
    return lambda params: cls(params, **kwargs)


def torch_optimizer_class(name: str) -> type:
    classes = {
        "sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
    }
    if hasattr(torch.optim, "Adafactor"):
        classes["adafactor"] = torch.optim.Adafactor
    if name not in classes:
        raise EstimatorError(f"optimizer.name: {name!r} has no torch.optim implementation to run; verify runs "
                             f"{', '.join(classes)}")
    return classes[name]


def torch_optimizer_kwargs(config: Config) -> dict[str, Any]:
    opt = config.optimizer
    name = opt.name
    kwargs: dict[str, Any] = {"lr": opt.option("lr")}
    if name in ("sgd", "momentum"):
        kwargs.update(momentum=opt.option("momentum") or 0.0, nesterov=opt.nesterov,
                      weight_decay=opt.option("weight_decay") or 0.0)
    elif name == "adagrad":
        kwargs.update(eps=opt.option("eps"), weight_decay=opt.option("weight_decay") or 0.0)
    elif name == "rmsprop":
        kwargs.update(alpha=opt.option("alpha"), eps=opt.option("eps"), momentum=opt.option("momentum") or 0.0,
                      centered=opt.centered, weight_decay=opt.option("weight_decay") or 0.0)
    elif name in ("adam", "adamw"):
        kwargs.update(betas=tuple(opt.option("betas")), eps=opt.option("eps"), amsgrad=opt.amsgrad,
                      weight_decay=opt.option("weight_decay") or 0.0)
    if opt.implementation == "for-loop":
        kwargs["foreach"] = False
    elif opt.implementation == "foreach":
        kwargs["foreach"] = True
    elif opt.implementation == "fused":
        kwargs["fused"] = True
    return kwargs
