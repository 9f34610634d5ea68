"""The job spec: what a client sends to ``POST /jobs``, what is stored on the job, what the worker runs.

The worker turns it into the engine's config (``worker.engine_config``); field names follow the engine's.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["dpo", "beta_dpo", "dama_data", "dama_model", "dama"]
# The methods that draw a kept subset of each filter group (dama_engine.objective.ObjectiveConfig.filters).
FILTERING_METHODS = frozenset({"beta_dpo", "dama_model", "dama"})

# Tiny models the worker builds on the spot (random weights, a local tokenizer): the embedded default and tests.
TINY_MODELS = {"dama/tiny-llava": "llava", "dama/tiny-qwen2-vl": "qwen2_vl", "dama/tiny-idefics3": "idefics3"}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Spec):
    beta: float = Field(default=0.1, gt=0, description="Base DPO temperature (DAMA.md section 3).")
    keep_ratio: float = Field(
        default=0.8, gt=0, le=1, description="Share of each batch kept by the model-aware filter."
    )
    gamma: float = Field(default=0.9, ge=0, lt=1, description="Momentum of the running reward-gap mean.")
    filter_scope: Literal["micro_batch", "step"] = Field(
        default="micro_batch",
        description="The group the model-aware filter sees (DAMA.md 2.5): micro_batch = each micro-batch across "
        "GPUs; step = every pair of the optimizer step (a no-grad scoring pass first, about a third more step time).",
    )
    learning_rate: float = Field(default=2e-5, gt=0, description="AdamW learning rate (LoRA default 2e-5).")
    epochs: int = Field(default=1, gt=0, le=100)
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(default=4, gt=0, le=1024, description="Pairs per GPU per micro-batch.")
    grad_accumulation: int = Field(default=1, gt=0, le=1024)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_length: int = Field(default=2048, gt=0, description="Tokens per sequence, image tokens included.")
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, about 30% slower."
    )
    compile: Literal["auto", "layers", "off"] = Field(
        default="auto",
        description="torch.compile of the decoder layers: auto = on GPU workers (eager if compiling fails), "
        "layers = always, off = never.",
    )
    seed: int = 0
    checkpoint_every: int = Field(default=50, gt=0, description="Save a resumable checkpoint every N steps.")
    eval_every: int | None = Field(default=None, gt=0, description="Held-out evaluation every N steps.")


class LoraSpec(_Spec):
    enabled: bool = Field(default=True, description="false: full fine-tune (for models that fit).")
    r: int = Field(default=16, gt=0, le=1024)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(default=None, description="Default: the family's LM projections.")
    train_projector: bool = Field(default=False, description="Also train the multimodal projector.")


class EvaluationSpec(_Spec):
    dataset_id: str | None = Field(
        default=None, description="Held-out pairs (an uploaded preference dataset).", examples=[None]
    )
    holdout_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="Or hold out this share of the data.", examples=[0.05]
    )
    generative_dataset_id: str | None = Field(
        default=None,
        description="A generative evaluation dataset (format 'generative': image, prompt, objects + vocabulary): "
        "after training, base and tuned answer its prompts and are scored for object hallucination (CHAIR).",
        examples=["ds_0192a0c1d2e3f4a5b6c7d9"],
    )
    max_new_tokens: int = Field(
        default=64, gt=0, le=4096, description="Greedy generation length on the generative set.", examples=[64]
    )

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationSpec:
        if self.dataset_id and self.holdout_fraction:
            raise ValueError("give evaluation.dataset_id or evaluation.holdout_fraction, not both")
        return self


_MODEL_DESCRIPTION = (
    "Base model: a hub name, a path on the workers, or a built-in tiny model "
    "(dama/tiny-llava, dama/tiny-qwen2-vl, dama/tiny-idefics3)."
)
ModelName = Annotated[str, Field(min_length=1, max_length=300, examples=["llava-hf/llava-1.5-7b-hf"])]
QueueName = Annotated[
    str | None,
    Field(description="Worker queue (one per GPU class); default: the service's.", pattern=r"^[a-z0-9_.-]{1,100}$"),
]
_REMOTE_CODE_DESCRIPTION = "Allow the model repo's own code (refused unless the service allows it)."


class JobSpec(_Spec):
    """A DAMA fine-tuning job."""

    model: ModelName = Field(description=_MODEL_DESCRIPTION)
    dataset_id: str = Field(
        description="Training pairs: an uploaded dataset's id.", examples=["ds_0192a0c1d2e3f4a5b6c7d8"]
    )
    method: Method = Field(default="dama", description="dpo, beta_dpo, dama_data, dama_model or dama (DAMA.md 4).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    evaluation: EvaluationSpec | None = Field(default=None, description="Held-out preference evaluation.")
    hardness_scorer: str = Field(
        default="openai/clip-vit-large-patch14-336",
        description="CLIP model for data hardness; unused when every row carries scores.",
    )
    trust_remote_code: bool = Field(default=False, description=_REMOTE_CODE_DESCRIPTION)
    gpus: int = Field(default=1, ge=1, le=64, description="GPUs for this job (torchrun DDP when > 1).")
    queue: QueueName = None
    suffix: str | None = Field(default=None, max_length=64, description="A label for the adapter.")

    @property
    def tiny_family(self) -> str | None:
        return TINY_MODELS.get(self.model)

    def filter_group_problem(self) -> str | None:
        """Why the model-aware filter's group is too small (DAMA.md 2.5: floor(keep_ratio x group) < 2 with
        filtering on), naming both fixes; None when it is fine. The engine refuses the same run
        (``dama_engine.objective.filter_group_problem``; this side cannot import it)."""
        hp = self.hyperparameters
        if self.method not in FILTERING_METHODS:
            return None
        group = hp.batch_size * self.gpus * (hp.grad_accumulation if hp.filter_scope == "step" else 1)
        if math.floor(hp.keep_ratio * group + 1e-9) >= 2:
            return None
        fix = (
            "set hyperparameters.filter_scope to 'step' or raise hyperparameters.batch_size"
            if hp.filter_scope == "micro_batch"
            else "raise hyperparameters.batch_size or hyperparameters.grad_accumulation"
        )
        return (
            f"the model-aware filter of method {self.method!r} would see {group} pairs at a time (filter_scope "
            f"{hp.filter_scope}), and floor(keep_ratio {hp.keep_ratio} x {group}) < 2 turns filtering off and sets "
            f"beta from one pair; {fix}"
        )


class GenerationSpec(_Spec):
    max_new_tokens: int = Field(
        default=128, gt=0, le=4096, description="Most tokens generated per answer (EOS stops sooner).", examples=[128]
    )
    temperature: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description="0: greedy decoding (default, reproducible); > 0: sampling.",
        examples=[0.0],
    )


class EvaluationCreate(_Spec):
    """An evaluation job: a base model (and optionally a tuned adapter) scored on uploaded datasets."""

    model: ModelName = Field(description=_MODEL_DESCRIPTION + " With adapter_job_id, the training job's base.")
    adapter_job_id: str | None = Field(
        default=None,
        description="A succeeded training job of this tenant: its adapter is the tuned model, compared against the "
        "base. Null: evaluate the base model alone.",
        examples=["job_0192a0c1d2e3f4a5b6c7d8"],
    )
    preference_dataset_id: str | None = Field(
        default=None,
        description="Held-out preference pairs (an uploaded preference dataset): log-prob accuracy per model and, "
        "with an adapter, DPO loss / accuracy / reward margin of the tuned model against the base, per hardness "
        "bucket when the rows carry hardness scores.",
        examples=["ds_0192a0c1d2e3f4a5b6c7d8"],
    )
    generative_dataset_id: str | None = Field(
        default=None,
        description="A generative evaluation dataset (format 'generative'): answers are generated and scored for "
        "object hallucination (CHAIR-s, CHAIR-i, coverage, hallucination rate).",
        examples=["ds_0192a0c1d2e3f4a5b6c7d9"],
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="How answers are decoded on the generative set."
    )
    max_samples: int | None = Field(
        default=None, gt=0, description="Use only the first N generative samples (null: all).", examples=[64]
    )
    max_pairs: int | None = Field(
        default=None, gt=0, description="Use only the first N preference pairs (null: all).", examples=[None]
    )
    max_length: int = Field(
        default=2048, gt=0, description="Tokens per scored sequence, image tokens included.", examples=[2048]
    )
    beta: float = Field(
        default=0.1, gt=0, description="Base beta of the implicit rewards (DAMA.md section 3).", examples=[0.1]
    )
    batch_size: int = Field(
        default=8, gt=0, le=1024, description="Pairs per scoring pass and prompts per generation batch.", examples=[8]
    )
    trust_remote_code: bool = Field(default=False, description=_REMOTE_CODE_DESCRIPTION, examples=[False])
    queue: QueueName = Field(default=None, examples=[None])

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> EvaluationCreate:
        if not self.preference_dataset_id and not self.generative_dataset_id:
            raise ValueError("give preference_dataset_id and/or generative_dataset_id: there is nothing to evaluate")
        return self

    @property
    def tiny_family(self) -> str | None:
        return TINY_MODELS.get(self.model)
