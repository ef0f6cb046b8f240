"""The config file: pydantic v2 models (unknown keys rejected), YAML/JSON loading, --set overrides.

Every problem becomes one readable line naming the field path (``optimizer.name: unknown optimizer
'adm'; did you mean 'adam'?``), raised as :class:`EstimatorError` so the CLI exits with code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from estimator.errors import EstimatorError
from estimator.names import unknown

PrecisionName = Literal["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MLPConfig(StrictModel):
    """The seed's "Cruncher": ``num_layers`` bias-free D x D linear layers and a D -> 1 head."""

    family: Literal["mlp"] = "mlp"
    dim: int = Field(4, gt=0, description="D, the width of every layer")
    num_layers: int = Field(2, gt=0, description="number of D x D layers before the D -> 1 head")


class TrainingConfig(StrictModel):
    """The batch and numeric format of one training step."""

    batch_size: int = Field(2, gt=0, description="B, samples (or sequences) per step")
    seq_len: int | None = Field(None, gt=0, description="tokens per sequence (transformer family)")
    precision: PrecisionName = Field("fp32", description="fp32 | bf16 | fp16 | amp-bf16 | amp-fp16")
    activation_checkpointing: Literal["none", "full"] = Field(
        "none", description="full: keep only each block's input, recompute the rest in backward"
    )


Implementation = Literal["auto", "for-loop", "foreach", "fused"]


class OptimizerConfig(StrictModel):
    """Which optimizer and its options; ``None`` means the optimizer's own default."""

    name: str = Field("adagrad", description="a registered optimizer (see `estimator optimizers`)")
    lr: float | None = Field(None, gt=0, description="learning rate")
    momentum: float | None = Field(None, ge=0, lt=1, description="momentum coefficient μ")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd, momentum)")
    alpha: float | None = Field(None, gt=0, lt=1, description="RMSProp smoothing constant")
    betas: tuple[float, float] | None = Field(None, description="Adam/Lion (β1, β2)")
    eps: float | None = Field(None, ge=0, description="ε added for numerical stability")
    weight_decay: float | None = Field(None, ge=0, description="weight decay λ")
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

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, value: bool, info: Any) -> bool:
        if value and info.data.get("name") not in ("sgd", "momentum"):
            raise ValueError("nesterov applies to sgd and momentum only")
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
from estimator.families.module import ModuleConfig  # noqa: E402
from estimator.families.transformer import TransformerConfig  # noqa: E402

FAMILY_CONFIGS: dict[str, type[StrictModel]] = {"mlp": MLPConfig, "transformer": TransformerConfig,
                                                "module": ModuleConfig}
ModelConfig = Annotated[Union[MLPConfig, TransformerConfig, ModuleConfig], Field(discriminator="family")]

MODEL_SOURCE_KEYS = ("preset", "hf_config")
"""Other ways to give the model section: a named preset, or a local Hugging Face config.json."""


def model_config_class(section: dict[str, Any]) -> type[StrictModel]:
    """The family config class a raw model section will validate as (for --set path checks)."""
    if any(key in section for key in MODEL_SOURCE_KEYS):
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
        return {"family": "module" if "module" in section else "mlp", **section}
    key = given[0]
    value = section.pop(key)
    if key == "preset":
        from estimator.presets import get_preset

        base = get_preset(str(value)).fields()
    else:
        from estimator.hf_config import read_hf_config

        path = Path(str(value)).expanduser()
        base = read_hf_config(path if path.is_absolute() else source_dir / path)
    return {**base, **section}


class Config(StrictModel):
    """One training step to estimate. The defaults are the seed's example (Cruncher, B=2, D=4)."""

    model: ModelConfig = Field(default_factory=MLPConfig, description="the model (see `estimator models`)")  # type: ignore[valid-type]
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="the device the step runs on: cuda (512-byte allocator blocks) or cpu"
    )
    # 'path=value' pairs a preset or hf_config model got from presets.TRAINING_DEFAULTS (for the header)
    _training_defaults: tuple[str, ...] = PrivateAttr(default=())

    @property
    def training_defaults(self) -> tuple[str, ...]:
        """The ``path=value`` defaults filled in because the model is a preset or an hf_config."""
        return self._training_defaults
