"""The config file: pydantic v2 models (unknown keys rejected), YAML/JSON loading, --set overrides.

Every problem becomes one readable line naming the field path (``optimizer.name: unknown optimizer
'adm'; did you mean 'adam'?``), raised as :class:`EstimatorError` so the CLI exits with code 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from estimator.errors import EstimatorError
from estimator.names import unknown

PrecisionName = Literal["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"]


MAX_LAYERS = 100_000
"""The most layers a model may have (~800x the deepest published dense transformer, Llama 3 405B's 126
blocks). Layers that repeat are costed once (``periodic.py``), so an estimate stays instant up to here;
the bound keeps the paths that do materialise every layer (a timeline chart, ``verify``) to seconds."""

MAX_EXPERTS = 1024
"""The most routed experts per MoE layer (4x the largest released router we model, DeepSeek-V3's 256).
Each expert is an event of the step, so the estimate grows with experts x layers: measured on this
project's 2-core machine, Mixtral-8x7B with 1,024 experts took 0.55 s (grouped_mm) and 27 s (eager,
an event per expert hit); 4,096 experts eager did not finish in 60 s (docs/cli.md)."""

MAX_EXPERT_LAYERS = 1_000_000
"""The most num_experts x num_layers: 8 experts x 100,000 layers took 11 s and 0.5 GB, 4,096 x 100,000
ran out of 6 GB after 57 s (docs/cli.md)."""


MAX_TENSOR_ELEMENTS = 1 << 60
"""The most elements a traced input may have: torch keeps sizes and byte counts in int64."""


def _tensor_specs(model: Any) -> list[tuple[str, Any]]:
    """(field path, spec) of a module family's inputs and target; [] for the other families."""
    specs = [(f"model.inputs.{i}", spec) for i, spec in enumerate(getattr(model, "inputs", None) or [])]
    target = getattr(model, "target", None)
    return specs + ([("model.target", target)] if target is not None else [])


class StrictModel(BaseModel):
    """Base for every config section: unknown keys, non-finite floats and booleans for numbers are errors.

    Pydantic's lax mode reads ``true`` as 1 for an ``int`` field (``dim: true`` would give D=1) and
    accepts NaN and infinities for ``float`` fields (which are not JSON); both are refused here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if field is not None and _bool_where_number(value, field.annotation):
                    raise PydanticCustomError("bool_for_number", "expected a number, not a boolean: {shown}",
                                              {"field": name, "shown": json.dumps(value, default=str)})
        return data


def _bool_where_number(value: Any, annotation: Any) -> bool:
    """True when ``value`` holds a bool where ``annotation`` wants an int or a float (not a bool)."""
    if annotation is None or annotation is Any or annotation is bool:
        return False
    if annotation in (int, float):
        return isinstance(value, bool)
    args = get_args(annotation)
    if not args:
        return False
    origin = get_origin(annotation)
    if origin is Annotated:
        return _bool_where_number(value, args[0])
    if origin in (Union, UnionType):
        if bool in args or any(get_origin(a) is Literal for a in args):
            return False
        return any(_bool_where_number(value, a) for a in args if a is not type(None))
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        items = args if origin is tuple and Ellipsis not in args else [args[0]] * len(value)
        return any(_bool_where_number(v, a) for v, a in zip(value, items, strict=False))
    return False


class MLPConfig(StrictModel):
    """The seed's "Cruncher": ``num_layers`` bias-free D x D linear layers and a D -> 1 head."""

    family: Literal["mlp"] = "mlp"
    dim: int = Field(4, gt=0, description="D, the width of every layer")
    num_layers: int = Field(2, gt=0, le=MAX_LAYERS, description="number of D x D layers before the D -> 1 head")


ParallelStrategy = Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp", "tp"]


class ParallelConfig(StrictModel):
    """How the step is spread over ranks (``--parallel`` and ``--world-size`` set the first two fields).

    ``training.batch_size`` is the batch of one rank. zero3 is FSDP2 ``fully_shard`` per block then the
    root with ``reshard_after_forward=True``; fsdp is the same with ``reshard_after_forward`` as given
    (False keeps each block's parameters gathered from its forward to its backward, ZeRO-2-like).
    """

    strategy: ParallelStrategy = Field(
        "none", description="none | ddp | zero1 | zero2 | zero3 | fsdp (FSDP2) | tp (tensor parallel)"
    )
    world_size: int = Field(1, ge=1, le=1 << 20, description="ranks (training.batch_size is per rank)")
    reshard_after_forward: bool = Field(
        True, description="fsdp: free each block's gathered parameters after its forward (FSDP2's default)"
    )
    tp_size: int = Field(
        1, ge=1, le=1 << 10, description="tensor-parallel degree t (docs/tp.md): tp alone needs world_size = t; "
        "fsdp/zero3 with t > 1 is a 2-D mesh of world_size / t data-parallel shards x t"
    )
    sequence_parallel: bool = Field(
        False, description="tp: shard the norms' and residual regions along the sequence (Korthikanti et al. 2022)"
    )
    loss_parallel: bool = Field(
        False, description="tp: keep the head's logits vocabulary-sharded into the loss (torch's loss_parallel)"
    )
    offload: bool = Field(
        False, description="zero3/fsdp: FSDP2's CPUOffloadPolicy: sharded parameters, gradients and optimizer "
        "state in host memory, the optimizer stepping on the CPU (estimate only: docs/distributed.md)"
    )
    sync_every_micro_batch: bool = Field(
        True, description="zero3/fsdp with training.grad_accum_steps > 1: reduce-scatter after every micro-batch "
        "(FSDP2's default); false keeps the unsharded gradients until the last (set_requires_gradient_sync(False))"
    )
    reduce_dtype: Literal["fp32", "param"] = Field(
        "fp32", description="zero3/fsdp with training.master_weights: FSDP2 MixedPrecisionPolicy.reduce_dtype, "
        "fp32 or the 16-bit param dtype (gradients reduce-scattered in it)"
    )
    fsdp_unit_class: str | list[str] | None = Field(
        None, description="zero3/fsdp of a model.module (or hf model): the submodule class(es) fully_shard wraps "
        "before the root "
        "(class names); null = the most repeated class of submodules holding parameters (docs/module.md)"
    )


def parallel_options_that_cannot_apply(parallel: ParallelConfig, strategy: str | None,
                                        master_weights: bool) -> list[str]:
    """One ``error`` line per ``parallel:`` option the layout in force would silently ignore.

    ``strategy`` is the one in force (``--parallel`` over ``parallel.strategy``; None: one device). Each
    option is read only by the layouts its field description names (``estimator/parallel/``), so a value
    other than its default anywhere else is refused rather than dropped (docs/cli.md, "options that cannot
    apply").
    """
    where = f"--parallel {strategy}" if strategy else "one device"
    fsdp = strategy in ("zero3", "fsdp")
    tensor = strategy == "tp" or parallel.tp_size > 1
    problems = []
    if strategy is None and parallel.world_size != 1:
        problems.append(f"parallel.world_size: {parallel.world_size} applies with a parallel.strategy "
                        "(or --parallel), not one device")
    if strategy is None and parallel.tp_size != 1:
        problems.append(f"parallel.tp_size: {parallel.tp_size} applies with --parallel tp, fsdp or zero3, "
                        "not one device")
    for name in ("sequence_parallel", "loss_parallel"):
        if getattr(parallel, name) and not tensor:
            problems.append(f"parallel.{name}: applies with tensor parallelism (--parallel tp, or --tp N), not {where}")
    if not parallel.reshard_after_forward and strategy != "fsdp":
        problems.append(f"parallel.reshard_after_forward: false applies with --parallel fsdp (zero3 always "
                        f"reshards), not {where}")
    if parallel.reduce_dtype != "fp32" and not (fsdp and master_weights):
        problems.append(f"parallel.reduce_dtype: applies with --parallel zero3 or fsdp and "
                        f"training.master_weights: true, not {where}" + ("" if master_weights else
                                                                          " without master weights"))
    if parallel.fsdp_unit_class is not None and not fsdp:
        problems.append(f"parallel.fsdp_unit_class: applies with --parallel zero3 or fsdp, not {where}")
    if not parallel.sync_every_micro_batch and strategy is None:
        problems.append("parallel.sync_every_micro_batch: false applies with a parallel.strategy "
                        "(or --parallel), not one device")
    return problems


class TrainingConfig(StrictModel):
    """The batch and numeric format of one training step."""

    batch_size: int = Field(2, gt=0, description="B, samples (or sequences) per step")
    seq_len: int | None = Field(None, gt=0, description="tokens per sequence (transformer family)")
    precision: PrecisionName = Field("fp32", description="fp32 | bf16 | fp16 | amp-bf16 | amp-fp16")
    activation_checkpointing: Literal["none", "full"] = Field(
        "none", description="full: keep only each block's input, recompute the rest in backward"
    )
    grad_accum_steps: int = Field(
        1, ge=1, le=1 << 20, description="micro-batches of batch_size per optimizer step (gradient accumulation); "
        "the global batch is batch_size x grad_accum_steps x data-parallel ranks"
    )
    master_weights: bool = Field(
        False, description="bf16/fp16: keep an fp32 master copy the optimizer updates (ZeRO/DeepSpeed/Megatron); "
        "under zero3/fsdp it is FSDP2's MixedPrecisionPolicy (fp32 shards, 16-bit all-gather): docs/precision.md"
    )

    @field_validator("master_weights")
    @classmethod
    def _master_needs_16_bit(cls, value: bool, info: ValidationInfo) -> bool:
        precision = info.data.get("precision")
        if value and precision not in ("bf16", "fp16"):
            raise ValueError(f"applies to the 16-bit precisions bf16 and fp16 (their fp32 master copy), "
                             f"not {precision!r}; amp-* keeps fp32 weights already")
        return value


Implementation = Literal["auto", "for-loop", "foreach", "fused"]


class OptimizerConfig(StrictModel):
    """Which optimizer and its options; ``None`` means the optimizer's own default."""

    name: str = Field("adagrad", description="a registered optimizer (see `estimator optimizers`)")
    lr: float | None = Field(None, description="learning rate (>= 0)")
    momentum: float | None = Field(None, description="momentum coefficient μ (>= 0)")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd, momentum)")
    alpha: float | None = Field(None, description="RMSProp smoothing constant (>= 0)")
    betas: tuple[float, float] | None = Field(None, description="Adam/Lion (β1, β2), each in [0, 1)")
    eps: float | None = Field(None, description="ε added for numerical stability (>= 0)")
    weight_decay: float | None = Field(None, description="weight decay λ (>= 0)")
    amsgrad: bool = Field(False, description="keep the running maximum of v (adam, adamw)")
    centered: bool = Field(False, description="centered RMSProp: also keep the mean gradient")
    implementation: Implementation = Field(
        "auto", description="torch.optim kernel: auto (what torch picks on the device) | for-loop | foreach | fused"
    )

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        from estimator.optimizers import optimizer_names

        key = name.strip().lower()
        known = optimizer_names()
        if key not in known:
            raise ValueError(unknown("optimizer", name, known))
        return key

    @field_validator("amsgrad")
    @classmethod
    def _amsgrad_only_adam(cls, value: bool, info: Any) -> bool:
        if value and info.data.get("name") not in ("adam", "adamw"):
            raise ValueError("amsgrad applies to adam and adamw only")
        return value

    @field_validator("centered")
    @classmethod
    def _centered_only_rmsprop(cls, value: bool, info: Any) -> bool:
        if value and info.data.get("name") != "rmsprop":
            raise ValueError("centered applies to rmsprop only")
        return value

    @field_validator("lr", "momentum", "alpha", "betas", "eps", "weight_decay")
    @classmethod
    def _torch_accepts(cls, value: Any, info: ValidationInfo) -> Any:
        """What the optimizer's constructor checks (see :func:`estimator.optimizers.option_problem`)."""
        from estimator.optimizers import option_problem

        name = info.data.get("name")
        problem = option_problem(name, info.field_name or "", value) if name else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, value: bool, info: ValidationInfo) -> bool:
        from estimator.optimizers import nesterov_problem

        name = info.data.get("name")
        problem = nesterov_problem(name, info.data.get("momentum")) if value and name else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("implementation")
    @classmethod
    def _fused_needs_kernel(cls, value: str, info: Any) -> str:
        from estimator.optimizers import get_optimizer, optimizer_names

        name = info.data.get("name")
        if value == "fused" and name in optimizer_names() and not get_optimizer(name).fused:
            fused = [n for n in optimizer_names() if get_optimizer(n).fused]
            raise ValueError(f"{name} has no fused kernel in torch.optim (fused: {', '.join(fused)})")
        return value

    def option(self, key: str) -> Any:
        """The value in force for ``key``: the user's, else the optimizer's registered default."""
        from estimator.optimizers import get_optimizer

        value = getattr(self, key, None)
        return get_optimizer(self.name).defaults.get(key) if value is None else value




# Family configs live with their families; imported here, after the base classes they build on.
from estimator.families.hf import HFModelConfig  # noqa: E402
from estimator.families.module import ModuleConfig  # noqa: E402
from estimator.families.moe import MoEConfig  # noqa: E402
from estimator.families.transformer import TransformerConfig  # noqa: E402

FAMILY_CONFIGS: dict[str, type[StrictModel]] = {"mlp": MLPConfig, "transformer": TransformerConfig,
                                                "module": ModuleConfig, "moe": MoEConfig, "hf": HFModelConfig}
ModelConfig = Annotated[Union[MLPConfig, TransformerConfig, ModuleConfig, MoEConfig, HFModelConfig],
                        Field(discriminator="family")]

MODEL_SOURCE_KEYS = ("preset", "hf_config", "hub")
"""Other ways to give the model section: a named preset, a local Hugging Face config.json, or a hub id
(``org/name``, read through huggingface_hub's cache; docs/hf.md)."""


def model_config_class(section: dict[str, Any]) -> type[StrictModel]:
    """The family config class a raw model section will validate as (for --set path checks)."""
    if any(key in section for key in MODEL_SOURCE_KEYS):
        if isinstance(section.get("preset"), str):  # an MoE preset validates as the moe family
            from estimator.presets import PRESETS

            preset = PRESETS.get(section["preset"].strip().lower())
            return FAMILY_CONFIGS.get(preset.family if preset else "transformer", MLPConfig)
        if isinstance(section.get("hf_config"), str) or isinstance(section.get("hub"), str):  # moe, hf or transformer
            from estimator.hf_config import section_family

            return FAMILY_CONFIGS.get(section_family(section), MLPConfig)
        return FAMILY_CONFIGS.get("transformer", MLPConfig)
    default = "module" if "module" in section else "mlp"  # `module: pkg:factory` implies the module family
    return FAMILY_CONFIGS.get(str(section.get("family", default)), MLPConfig)


def expand_model_section(section: dict[str, Any], source_dir: Path) -> dict[str, Any]:
    """Replace ``preset: NAME`` / ``hf_config: PATH`` by the family fields they stand for.

    Keys given beside them override the preset's values (``{preset: gpt2, num_layers: 6}``).
    """
    section = dict(section)
    given = [key for key in MODEL_SOURCE_KEYS if key in section]
    if len(given) > 1:
        raise EstimatorError(f"model: give one of {', '.join(MODEL_SOURCE_KEYS)}, not {' and '.join(given)}")
    if not given:
        if "module" in section and section.get("family", "module") == "module":
            from estimator.families.module import with_search_dir

            section = with_search_dir(section, source_dir)  # the factory is found next to the config
        return {"family": "module" if "module" in section else "mlp", **section}
    key = given[0]
    value = section.pop(key)
    if key == "preset":
        from estimator.presets import get_preset

        base = get_preset(str(value)).fields()
    else:
        from estimator.hf_config import expand_hf_section

        return expand_hf_section({key: value, **section}, source_dir)  # analytic, or the real model (docs/hf.md)
    return {**base, **section}


class Config(StrictModel):
    """One training step to estimate. The defaults are the seed's example (Cruncher, B=2, D=4)."""

    model: ModelConfig = Field(default_factory=MLPConfig, description="the model (see `estimator models`)")  # type: ignore[valid-type]
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="data/model parallel layout")
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="the device the step runs on: cuda (512-byte allocator blocks) or cpu"
    )
    # 'path=value' pairs a preset or hf_config model got from presets.TRAINING_DEFAULTS (for the header)
    _training_defaults: tuple[str, ...] = PrivateAttr(default=())
    # an hf_config/hub model's checkpoint beside its config.json (safetensors_header.CheckpointCount), or None
    _checkpoint: Any = PrivateAttr(default=None)
    # what the analytic family leaves out of an hf_config model's real step (hf_config.analytic_omissions)
    _omissions: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _options_that_apply(self) -> Config:
        """Refuse a setting the model family would silently ignore (each message names its field)."""
        family = self.model.family
        if family == "mlp" and self.training.seq_len is not None:
            raise ValueError("training.seq_len: the mlp family has no sequence (B samples of D features); "
                             "remove it, or use a transformer (--model NAME)")
        for where, spec in _tensor_specs(self.model):
            numel = math.prod(spec.shape)
            if numel > MAX_TENSOR_ELEMENTS:
                raise ValueError(f"{where}.shape: at most 2^60 elements per tensor (torch counts bytes in 64 bits),"
                                 f" got {numel:.3g}")
            if spec.high is not None and spec.high > 2**63 - 1:
                raise ValueError(f"{where}.high: at most 2^63 - 1 (an int64 value), got {spec.high:.3g}")
        layers = getattr(self.model, "num_layers", None)
        if isinstance(layers, int) and layers > MAX_LAYERS:
            raise ValueError(f"model.num_layers: at most {MAX_LAYERS:,} layers, got {layers:,}")
        experts = getattr(self.model, "num_experts", None)
        if isinstance(experts, int) and experts > MAX_EXPERTS:
            raise ValueError(f"model.num_experts: at most {MAX_EXPERTS:,} routed experts, got {experts:,}")
        if isinstance(experts, int) and isinstance(layers, int) and experts * layers > MAX_EXPERT_LAYERS:
            raise ValueError(f"model.num_experts: at most {MAX_EXPERT_LAYERS:,} experts x layers in all, got "
                             f"{experts:,} x {layers:,}")
        return self

    @property
    def checkpoint(self) -> Any:
        """The safetensors count of the checkpoint beside an hf_config/hub config.json (None without one)."""
        return self._checkpoint

    @property
    def analytic_omissions(self) -> tuple[str, ...]:
        """What the analytic family leaves out of an hf_config model's real step (empty for every other model)."""
        return self._omissions

    @property
    def training_defaults(self) -> tuple[str, ...]:
        """The ``path=value`` defaults filled in because the model is a preset or an hf_config."""
        return self._training_defaults
