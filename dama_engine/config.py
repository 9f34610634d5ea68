"""Typed configuration of one training run, loaded from YAML with ``key=value`` overrides.

One pydantic model per concern; unknown keys are rejected (a typo must not silently fall back to a default),
and every bad value is reported with its dotted field path before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dama_engine.data import PixelBudget
from dama_engine.errors import UserError
from dama_engine.objective import ObjectiveConfig
from dama_settings.knobs import (
    DATA,
    DISTRIBUTED,
    EVALUATION,
    HARDNESS,
    KEEP_CHECKPOINTS_FULL,
    KEEP_CHECKPOINTS_LORA,
    LORA,
    MODEL,
    OBJECTIVE,
    OPTIM,
    RUN,
)
from dama_settings.names import (
    Aggregation,
    CompileMode,
    DataFormat,
    EmaSource,
    FilterScope,
    FilterStd,
    HardnessRescale,
    Method,
    PairForward,
    Precision,
    Scheduler,
    Strategy,
)

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(UserError):
    """A configuration value is wrong; the message names the field and what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name_or_path: str = Field(description="Hub name or local folder of an image-text-to-text model.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = MODEL["trust_remote_code"].field()
    precision: Precision = MODEL["precision"].field()
    attn_implementation: str | None = Field(default=None, description="e.g. sdpa, eager, flash_attention_2.")
    init_adapter: str | None = Field(
        default=None,
        description="A PEFT LoRA adapter folder to start from (a checkpoint's adapter/ or a finished run's adapter): "
        "it is loaded onto the base and trained further (its LoRA shape replaces lora.r/alpha/target_modules); the "
        "reference of a preference method is base + this adapter, frozen (shared/DAMA.md section 4b).",
    )
    public_name: str | None = Field(
        default=None,
        description="The base model's name in the adapter (adapter_config.json's base_model_name_or_path) and its "
        "model card; default name_or_path. The service sets the name its users know (a built-in model's name), "
        "never the folder it was staged in.",
    )

    @property
    def shown_name(self) -> str:
        """The name the adapter and its model card give the base model."""
        return self.public_name or self.name_or_path


class DataSection(_Section):
    train: str = Field(description="Training data: a file, a folder or an archive in a supported format.")
    eval: str | None = Field(default=None, description="Held-out pairs, same formats.")
    eval_fraction: float = DATA["eval_fraction"].field()
    format: DataFormat = DATA["format"].field()
    max_length: int = DATA["max_length"].field()
    truncate_answers: bool = DATA["truncate_answers"].field()
    skip_invalid_rows: bool = DATA["skip_invalid_rows"].field()
    max_pixels: int | None = DATA["max_pixels"].field()
    min_pixels: int | None = DATA["min_pixels"].field()
    max_image_side: int | None = DATA["max_image_side"].field()

    @model_validator(mode="after")
    def _pixel_budget_order(self) -> DataSection:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels {self.min_pixels} is above data.max_pixels {self.max_pixels}")
        return self

    def pixel_budget(self) -> PixelBudget:
        return PixelBudget(self.max_pixels, self.min_pixels, self.max_image_side)


class LoraSection(_Section):
    enabled: bool = LORA["enabled"].field()
    r: int = LORA["r"].field()
    alpha: int = LORA["alpha"].field()
    dropout: float = LORA["dropout"].field()
    target_modules: list[str] | None = LORA["target_modules"].field()
    train_projector: bool = LORA["train_projector"].field()
    freeze_vision_tower: bool = True


class ObjectiveSection(_Section):
    """The fields of :class:`dama_engine.objective.ObjectiveConfig` (shared/DAMA.md sections 2-4)."""

    method: Method = OBJECTIVE["method"].field()
    beta: float = OBJECTIVE["beta"].field()
    keep_ratio: float = OBJECTIVE["keep_ratio"].field()
    gamma: float = OBJECTIVE["gamma"].field()
    beta_min: float = OBJECTIVE["beta_min"].field()
    beta_max: float = OBJECTIVE["beta_max"].field()
    filter_std: FilterStd = OBJECTIVE["filter_std"].field()
    filter_sigma: float = OBJECTIVE["filter_sigma"].field()
    ema_source: EmaSource = OBJECTIVE["ema_source"].field()
    beta_dpo_a: float = OBJECTIVE["beta_dpo_a"].field()
    filter_scope: FilterScope = OBJECTIVE["filter_scope"].field()

    def build(self) -> ObjectiveConfig:
        return ObjectiveConfig(**self.model_dump())


class HardnessSection(_Section):
    scorer: str = HARDNESS["scorer"].field()
    aggregation: Aggregation = HARDNESS["aggregation"].field()
    splitter: str = HARDNESS["splitter"].field()
    batch_size: int = HARDNESS["batch_size"].field()
    rescale: HardnessRescale = HARDNESS["rescale"].field()


class OptimSection(_Section):
    learning_rate: float = OPTIM["learning_rate"].field()
    weight_decay: float = OPTIM["weight_decay"].field()
    warmup_ratio: float = OPTIM["warmup_ratio"].field()
    scheduler: Scheduler = OPTIM["scheduler"].field()
    max_grad_norm: float | None = OPTIM["max_grad_norm"].field()
    epochs: int = OPTIM["epochs"].field()
    max_steps: int | None = OPTIM["max_steps"].field()
    batch_size: int = OPTIM["batch_size"].field()
    grad_accumulation: int = OPTIM["grad_accumulation"].field()
    gradient_checkpointing: bool = OPTIM["gradient_checkpointing"].field()
    pair_forward: PairForward = OPTIM["pair_forward"].field()
    compile: CompileMode = OPTIM["compile"].field()
    seed: int = OPTIM["seed"].field()

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        # YAML reads a bare `off` / `on` as a boolean.
        return {False: "off", True: "layers"}.get(value, value) if isinstance(value, bool) else value


class EvaluationSection(_Section):
    """Base against tuned after training (dama_engine.evaluation): the held-out pairs per hardness bucket, and
    hallucination metrics (CHAIR, coverage) on a generative set when one is given."""

    enabled: bool = Field(default=True, description="Run it when data.eval or evaluation.generative is set.")
    generative: str | None = Field(default=None, description="Generative eval JSONL (image, prompt, objects).")
    vocabulary: str | None = Field(default=None, description="Object vocabulary JSON (needed with generative).")
    max_samples: int | None = EVALUATION["max_samples"].field()
    max_pairs: int | None = Field(default=None, gt=0, description="Held-out pairs used (None: all).")
    max_new_tokens: int = EVALUATION["max_new_tokens"].field()
    pope: bool = EVALUATION["pope"].field()

    @model_validator(mode="after")
    def _vocabulary_with_generative(self) -> EvaluationSection:
        if self.generative and not self.vocabulary:
            raise ValueError("evaluation.vocabulary is needed with evaluation.generative")
        return self


class RunSection(_Section):
    output_dir: str = "runs/dama"
    cache_dir: str | None = Field(
        default=None, description="Reference log-probs and hardness cache; default under output_dir."
    )
    checkpoint_every: int | None = RUN["checkpoint_every"].field()
    keep_checkpoints: int | None = RUN["keep_checkpoints"].field()
    eval_every: int | None = RUN["eval_every"].field()
    log_every: int = Field(default=1, gt=0)
    resume: bool = Field(default=True, description="Resume from the newest checkpoint in output_dir if present.")
    distributed_timeout_s: int = Field(
        default=6 * 3600, gt=0, description="Process-group timeout with several processes (rank 0 evaluates alone)."
    )
    threads: int | None = Field(
        default=None,
        gt=0,
        description="CPU threads torch uses in this process; default DAMA_TORCH_THREADS, else 1 (measured fastest "
        "on a shared 2-core machine; see dama_engine.threads).",
    )


class DistributedSection(_Section):
    """How several processes (``torchrun``) share the run; one process ignores it."""

    strategy: Strategy = DISTRIBUTED["strategy"].field()


class TrainConfig(_Section):
    model: ModelSection
    data: DataSection
    lora: LoraSection = LoraSection()
    objective: ObjectiveSection = ObjectiveSection()
    hardness: HardnessSection = HardnessSection()
    evaluation: EvaluationSection = EvaluationSection()
    optim: OptimSection = OptimSection()
    run: RunSection = RunSection()
    distributed: DistributedSection = DistributedSection()

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.data.eval is not None and self.data.eval_fraction > 0:
            raise ValueError("data.eval and data.eval_fraction are both set; give one way to hold out pairs")
        return self

    @property
    def checkpoints_kept(self) -> int:
        """``run.keep_checkpoints``, or when unset (null) by kind of run: a full fine-tune's checkpoint holds the
        whole model and its optimizer states, so one is kept. Resolved here, not stored, so a config dumped and
        changed (``lora.enabled=false``) still gets the default of its kind."""
        if self.run.keep_checkpoints is not None:
            return self.run.keep_checkpoints
        return KEEP_CHECKPOINTS_LORA if self.lora.enabled else KEEP_CHECKPOINTS_FULL


def _set_dotted(values: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config, apply ``section.key=value`` overrides (values parsed as YAML), validate.

    Raises:
        ConfigError: naming every bad field, e.g. ``optim.learning_rate: Input should be greater than 0``.
    """
    values = read_yaml_mapping(path) if path is not None else {}
    return parse_config(apply_overrides(values, overrides))


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping); ConfigError otherwise."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {path}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded or {}


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a config mapping, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected section.key=value")
        _set_dotted(values, key.strip(), raw)
    return values


def parse_config(values: dict[str, Any]) -> TrainConfig:
    return validate_config(TrainConfig, values, "config")


def validate_config(model: type[ConfigT], values: dict[str, Any], what: str) -> ConfigT:
    """``model`` validated from ``values``; a ConfigError listing each bad field as ``path: message`` otherwise."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "config"
            lines.append(f"{where}: {item['msg']}")
        raise ConfigError(f"invalid {what}:\n  " + "\n  ".join(lines)) from None
