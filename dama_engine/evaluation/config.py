"""The evaluation's config (``dama-eval CONFIG.yaml``), and the one built from a training config to evaluate
after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dama_engine.config import ModelSection, TrainConfig, apply_overrides, read_yaml_mapping, validate_config
from dama_engine.data import PreferenceRow
from dama_engine.evaluation.judge import JudgeConfig
from dama_engine.forward import GenerationSettings
from dama_engine.objective import user_hardness
from dama_settings.knobs import HARDNESS
from dama_settings.names import Aggregation, HardnessRescale

# ---------------------------------------------------------------------------------------------------------------
# Configuration


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EvalDataSection(_Section):
    preference: str | None = Field(
        default=None, description="Held-out preference pairs: a file, folder or archive in any dama-train format."
    )
    format: Literal["auto", "trl", "rlaif_v", "openai"] = "auto"
    generative: str | None = Field(default=None, description="Generative eval JSONL (image, prompt, objects).")
    vocabulary: str | None = Field(default=None, description="Vocabulary JSON for CHAIR (needed with generative).")
    max_pairs: int | None = Field(default=None, gt=0, description="Use only the first N preference pairs.")
    max_samples: int | None = Field(default=None, gt=0, description="Use only the first N generative samples.")
    max_length: int = Field(default=2048, gt=0, description="Tokens per scored sequence, image tokens included.")
    truncate_answers: bool = False
    skip_invalid_rows: bool = Field(default=False, description="Leave out bad or over-long pairs instead of stopping.")


class EvalHardnessSection(_Section):
    scorer: str | None = Field(
        default=None,
        description="CLIP model scoring pairs that carry no hardness scores; none: no buckets for such data.",
    )
    aggregation: Aggregation = HARDNESS["aggregation"].field()
    splitter: str = HARDNESS["splitter"].field()
    batch_size: int = HARDNESS["batch_size"].field()
    rescale: HardnessRescale = HARDNESS["rescale"].field()
    thresholds: tuple[float, float] | None = Field(
        default=None, description="(low, high) bucket thresholds on delta; default: the data's tertiles."
    )

    @model_validator(mode="after")
    def _ordered(self) -> EvalHardnessSection:
        if self.thresholds is not None and self.thresholds[0] > self.thresholds[1]:
            raise ValueError("hardness.thresholds must be [low, high] with low <= high")
        return self


class PopeSection(_Section):
    """POPE's yes/no questions on the generative set's images (:mod:`dama_engine.evaluation.pope`), answered with
    greedy decoding whatever ``generation`` says."""

    enabled: bool = Field(default=True, description="Ask POPE's questions whenever a generative set is given.")
    per_image: int = Field(default=3, gt=0, description="Present entries, and absent ones per split, asked per image.")
    seed: int = Field(default=0, description="Seed of the drawn entries (the present ones and the random split's).")
    max_new_tokens: int = Field(default=16, gt=0, description="Most tokens per answer (a yes or no is enough).")


class EvaluationConfig(_Section):
    """One evaluation run: the base model, the tuned adapter (optional), the data and how to decode.

    ``model.init_adapter``: the PEFT adapter the tuned one was trained from; the tuned adapter is then compared
    against base + that adapter (``base``), and the plain base model is reported as ``plain_base``."""

    model: ModelSection
    adapter: str | None = Field(
        default=None,
        description="The tuned model: a PEFT adapter folder (dama-train's OUTPUT/adapter) or a full model folder.",
    )
    adapter_name: str | None = Field(
        default=None,
        description="The tuned model's name in the results and the chart; default the adapter's folder. The service "
        "names the training job, never the folder the adapter was staged in.",
    )
    data: EvalDataSection = EvalDataSection()
    generation: GenerationSettings = GenerationSettings()
    hardness: EvalHardnessSection = EvalHardnessSection()
    pope: PopeSection = PopeSection()
    judge: JudgeConfig | None = Field(
        default=None, description="Optional OpenAI-compatible judge of generative answers (MMHal-style 0-6)."
    )
    beta: float = Field(default=0.1, gt=0, description="The base beta of the implicit rewards (DAMA.md section 3).")
    batch_size: int = Field(default=8, gt=0, description="Pairs per scoring pass and prompts per generation batch.")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda or cuda:N.")
    output_dir: str = "runs/eval"

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationConfig:
        data = self.data
        if data.preference is None and data.generative is None:
            raise ValueError("give data.preference and/or data.generative: there is nothing to evaluate")
        if data.generative is not None and data.vocabulary is None:
            raise ValueError("data.generative needs data.vocabulary (object names and synonyms for CHAIR)")
        if data.vocabulary is not None and data.generative is None:
            raise ValueError("data.vocabulary is set but data.generative is not; give both or neither")
        return self


def parse_evaluation_config(values: dict[str, Any]) -> EvaluationConfig:
    return validate_config(EvaluationConfig, values, "evaluation config")


def load_evaluation_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> EvaluationConfig:
    """Read a YAML evaluation config, apply ``key=value`` / ``section.key=value`` overrides, validate."""
    values = read_yaml_mapping(path) if path is not None else {}
    return parse_evaluation_config(apply_overrides(values, overrides))


# --------------------------------------------------------------------------------------------------------------
# After training: base against tuned on the run's held-out pairs and generative set
# --------------------------------------------------------------------------------------------------------------


def after_training_config(
    config: TrainConfig, adapter_dir: Path, output_dir: Path, *, train_rows: Sequence[PreferenceRow], held_out: bool
) -> EvaluationConfig:
    """The evaluation a training run ends with (``config.evaluation``): its held-out pairs (``data.eval`` or the
    ``data.eval_fraction`` split) and its generative set. Pairs are bucketed by hardness as the run computed it:
    user scores with the run's ``hardness.rescale``, or, when CLIP scored the training data, the same CLIP scorer
    and aggregation (pairs without scores are not scored when the run used none: that would load a scorer the run
    never needed)."""
    section = config.evaluation
    clip_scored = config.objective.build().uses_hardness and user_hardness(train_rows) is None
    preference = config.data.eval
    if preference is None and held_out:
        preference = f"{config.data.train} (held out: data.eval_fraction {config.data.eval_fraction})"
    return parse_evaluation_config(
        {
            "model": config.model.model_dump(),
            "adapter": str(adapter_dir),
            "adapter_name": f"this run's {config.objective.method} adapter",
            "data": {
                "preference": preference if held_out else None,
                "format": config.data.format,
                "generative": section.generative,
                "vocabulary": section.vocabulary,
                "max_pairs": section.max_pairs,
                "max_samples": section.max_samples,
                "max_length": config.data.max_length,
                "truncate_answers": config.data.truncate_answers,
                "skip_invalid_rows": config.data.skip_invalid_rows,
            },
            "generation": {"max_new_tokens": section.max_new_tokens},
            "pope": {"enabled": section.pope},
            "hardness": {
                "scorer": config.hardness.scorer if clip_scored else None,
                "aggregation": config.hardness.aggregation,
                "splitter": config.hardness.splitter,
                "batch_size": config.hardness.batch_size,
                "rescale": config.hardness.rescale,
            },
            "beta": config.objective.beta,
            "batch_size": config.optim.batch_size,
            "output_dir": str(output_dir / "evaluation"),
        }
    )
