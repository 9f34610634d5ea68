"""Typed configuration of one training run, loaded from YAML with ``key=value`` overrides.

One pydantic model per concern; unknown keys are rejected (a typo must not silently fall back to a default),
and every bad value is reported with its dotted field path before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dama_engine.compiling import CompileMode
from dama_engine.objective import ObjectiveConfig


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name_or_path: str = Field(description="Hub name or local folder of an image-text-to-text model.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(default=False, description="Allow the model repo's own code. Off by default.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 where the hardware supports it, float32 otherwise."
    )
    attn_implementation: str | None = Field(default=None, description="e.g. sdpa, eager, flash_attention_2.")


class DataSection(_Section):
    train: str = Field(description="Training data: a file, a folder or an archive in a supported format.")
    eval: str | None = Field(default=None, description="Held-out pairs, same formats.")
    eval_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Hold out this share of `train` when `eval` is not given."
    )
    format: Literal["auto", "trl", "rlaif_v", "openai"] = "auto"
    max_length: int = Field(default=2048, gt=0, description="Tokens per sequence, image tokens included.")
    truncate_answers: bool = Field(
        default=False,
        description="Cut over-long answers to fit max_length instead of rejecting the row. Never cuts the prompt.",
    )
    skip_invalid_rows: bool = Field(default=False, description="Drop rows that fail validation instead of stopping.")


class LoraSection(_Section):
    enabled: bool = Field(default=True, description="LoRA (default) or full fine-tuning of the language model.")
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        default=None, description="Module names; default: the family's language-model projections."
    )
    train_projector: bool = Field(default=False, description="Also train the multimodal projector in full.")
    freeze_vision_tower: bool = True


class ObjectiveSection(_Section):
    """The fields of :class:`dama_engine.objective.ObjectiveConfig` (shared/DAMA.md sections 2-4)."""

    method: Literal["dpo", "beta_dpo", "dama_data", "dama_model", "dama"] = "dama"
    beta: float = Field(default=0.1, gt=0)
    keep_ratio: float = Field(default=0.8, gt=0, le=1)
    gamma: float = Field(default=0.9, ge=0, lt=1)
    beta_min: float = Field(default=1e-3, gt=0)
    beta_max: float = Field(default=1e6, gt=0)
    filter_std: Literal["fixed", "running"] = "fixed"
    filter_sigma: float = Field(default=1.0, gt=0)
    ema_source: Literal["all", "kept"] = "all"
    beta_dpo_a: float = 0.6
    filter_scope: Literal["micro_batch", "step"] = Field(
        default="micro_batch",
        description=(
            "The group the model-aware filter and alpha_M see (shared/DAMA.md 2.5): micro_batch = each micro-batch "
            "across processes; step = every pair of the optimizer step (a no-grad scoring pass first)."
        ),
    )

    def build(self) -> ObjectiveConfig:
        return ObjectiveConfig(**self.model_dump())


class HardnessSection(_Section):
    scorer: str = Field(default="openai/clip-vit-large-patch14-336", description="CLIP model name or path.")
    aggregation: Literal["joint_softmax", "mean_cosine"] = "joint_softmax"
    splitter: str = "rule"
    batch_size: int = Field(default=32, gt=0)


class OptimSection(_Section):
    # LoRA needs a far larger step than the paper's full fine-tune (5e-7); 2e-5 is the usual LoRA-DPO choice.
    learning_rate: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(default=4, gt=0, description="Pairs per device per micro-batch.")
    grad_accumulation: int = Field(default=1, gt=0)
    gradient_checkpointing: bool = False
    pair_forward: Literal["auto", "packed", "two_rows", "model_logits"] = Field(
        default="auto",
        description=(
            "How pairs go through the model (dama_engine.packing): packed = one row per pair [prompt, chosen, "
            "rejected] and the lm_head on answer positions only; two_rows = a row per answer, same head; "
            "model_logits = a row per answer and the model's own logits; auto = packed where the model family "
            "and attention take it, else two_rows, else model_logits."
        ),
    )
    compile: CompileMode = Field(
        default="auto",
        description=(
            "Regional torch.compile of the language model's decoder layers (dama_engine.compiling): layers = "
            "always; auto = on CUDA only, falling back to eager with a warning if compiling fails; off = never."
        ),
    )
    seed: int = 0

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
    max_samples: int | None = Field(default=64, gt=0, description="Generative samples used (None: all).")
    max_pairs: int | None = Field(default=None, gt=0, description="Held-out pairs used (None: all).")
    max_new_tokens: int = Field(default=64, gt=0, description="Greedy generation length.")

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
    checkpoint_every: int | None = Field(default=None, gt=0, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(default=2, gt=0)
    eval_every: int | None = Field(default=None, gt=0, description="Evaluate on the held-out split every N steps.")
    log_every: int = Field(default=1, gt=0)
    resume: bool = Field(default=True, description="Resume from the newest checkpoint in output_dir if present.")
    distributed_timeout_s: int = Field(
        default=6 * 3600, gt=0, description="Process-group timeout with several processes (rank 0 evaluates alone)."
    )


class TrainConfig(_Section):
    model: ModelSection
    data: DataSection
    lora: LoraSection = LoraSection()
    objective: ObjectiveSection = ObjectiveSection()
    hardness: HardnessSection = HardnessSection()
    evaluation: EvaluationSection = EvaluationSection()
    optim: OptimSection = OptimSection()
    run: RunSection = RunSection()

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.data.eval is not None and self.data.eval_fraction > 0:
            raise ValueError("data.eval and data.eval_fraction are both set; give one way to hold out pairs")
        return self


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
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "config"
            lines.append(f"{where}: {item['msg']}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
