"""The job spec: what a client sends to ``POST /jobs``, what is stored on the job, what the worker runs.

The worker turns it into the engine's config (``worker.engine_config``); field names follow the engine's.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dama_settings.knobs import DATA, DISTRIBUTED, EVALUATION, HARDNESS, LORA, MODEL, OBJECTIVE, OPTIM, RUN
from dama_settings.names import CompileMode, EmaSource, FilterScope, FilterStd, HardnessRescale, Strategy
from dama_settings.names import Method as Method
from dama_settings.presets import PRESETS, with_preset
from dama_settings.rules import too_small_filter_group
from jobstore.judges import JudgeName

# Names under this prefix are the service's own models: only those below exist (anything else is a typo).
BUILTIN_PREFIX = "dama/"
# Tiny models the worker builds on the spot (random weights, a local tokenizer): the embedded default and tests.
TINY_MODELS = {"dama/tiny-llava": "llava", "dama/tiny-qwen2-vl": "qwen2_vl", "dama/tiny-idefics3": "idefics3"}
# The proving ground's seeing base (dama_engine.proving), which the worker also builds on the spot: a tiny LLaVA
# trained to see the shapes world that calls orange objects red. Trained, not random: no tiny-model defaults.
SEEING_MODEL = "dama/tiny-seeing-llava"
# Every built-in model and its family.
BUILTIN_MODELS = {**TINY_MODELS, SEEING_MODEL: "llava"}


INIT_ADAPTER_PATTERN = r"^job_[A-Za-z0-9]{1,60}(:[0-9]{1,9})?$"

# An uploaded object's id (``ds_...``, ``job_...``): bounded, like every string and list a spec may hold.
ObjectId = Annotated[str, Field(min_length=1, max_length=100)]


def split_init_adapter(init_adapter: str | None) -> tuple[str, int | None] | None:
    """``init_adapter`` split into the source job's id and the checkpoint step (None: its final adapter)."""
    if init_adapter is None:
        return None
    job_id, _, step = init_adapter.partition(":")
    return job_id, int(step) if step else None


class _Spec(BaseModel):
    # No Infinity/NaN: a spec is stored as JSON, and JSON has neither. Strict: a value is taken as the type the
    # OpenAPI document says, never coerced ("true" is not a boolean, "2" and 2.0 are not integers).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul_characters(cls, value: Any) -> Any:
        # PostgreSQL stores no NUL character in text or JSONB, and no name, id or label needs one.
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "\x00" in text for text in texts):
            raise ValueError("must not contain a NUL character (\\u0000)")
        return value


class Hyperparameters(_Spec):
    """Defaults, bounds and descriptions: ``dama_settings.knobs`` (the engine config's, with the service's caps)."""

    beta: float = OBJECTIVE["beta"].field(service=True)
    keep_ratio: float = OBJECTIVE["keep_ratio"].field(service=True)
    gamma: float = OBJECTIVE["gamma"].field(service=True)
    filter_scope: FilterScope = OBJECTIVE["filter_scope"].field(service=True)
    filter_std: FilterStd = OBJECTIVE["filter_std"].field(service=True)
    filter_sigma: float = OBJECTIVE["filter_sigma"].field(service=True)
    ema_source: EmaSource = OBJECTIVE["ema_source"].field(service=True)
    learning_rate: float = OPTIM["learning_rate"].field(service=True)
    epochs: int = OPTIM["epochs"].field(service=True)
    max_steps: int | None = OPTIM["max_steps"].field(service=True)
    batch_size: int = OPTIM["batch_size"].field(service=True)
    grad_accumulation: int = OPTIM["grad_accumulation"].field(service=True)
    warmup_ratio: float = OPTIM["warmup_ratio"].field(service=True)
    weight_decay: float = OPTIM["weight_decay"].field(service=True)
    max_length: int = DATA["max_length"].field(service=True)
    max_pixels: int | None = DATA["max_pixels"].field(service=True)
    min_pixels: int | None = DATA["min_pixels"].field(service=True)
    max_image_side: int | None = DATA["max_image_side"].field(service=True)
    gradient_checkpointing: bool = OPTIM["gradient_checkpointing"].field(service=True)
    compile: CompileMode = OPTIM["compile"].field(service=True)
    seed: int = OPTIM["seed"].field(service=True)
    checkpoint_every: int = RUN["checkpoint_every"].field(service=True)
    keep_checkpoints: int | None = RUN["keep_checkpoints"].field(service=True)
    eval_every: int | None = RUN["eval_every"].field(service=True)


class LoraSpec(_Spec):
    enabled: bool = LORA["enabled"].field(service=True)
    r: int = LORA["r"].field(service=True)
    alpha: int = LORA["alpha"].field(service=True)
    dropout: float = LORA["dropout"].field(service=True)
    target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = LORA["target_modules"].field(
        service=True
    )
    train_projector: bool = LORA["train_projector"].field(service=True)


class EvaluationSpec(_Spec):
    """Held-out preference evaluation after training: pairs of another dataset (dataset_id) or a share of the
    training pairs (holdout_fraction), not both."""

    # The rule of _one_source, in the OpenAPI document.
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["dataset_id", "holdout_fraction"],
                "properties": {"dataset_id": {"type": "string"}, "holdout_fraction": {"exclusiveMinimum": 0}},
            }
        }
    )

    dataset_id: ObjectId | None = Field(
        default=None, description="Held-out pairs (an uploaded preference dataset).", examples=[None]
    )
    holdout_fraction: float = DATA["eval_fraction"].field(service=True, examples=[0.05])
    generative_dataset_id: ObjectId | None = Field(
        default=None,
        description="A generative evaluation dataset (format 'generative': image, prompt, objects + vocabulary): "
        "after training, base and tuned answer its prompts and are scored for object hallucination (CHAIR).",
        examples=["ds_0192a0c1d2e3f4a5b6c7d9"],
    )
    max_new_tokens: int = EVALUATION["max_new_tokens"].field(service=True, examples=[64])
    max_samples: int | None = EVALUATION["max_samples"].field(service=True, examples=[64])
    pope: bool = EVALUATION["pope"].field(service=True, examples=[True])

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationSpec:
        if self.dataset_id and self.holdout_fraction:
            raise ValueError("give evaluation.dataset_id or evaluation.holdout_fraction, not both")
        return self


class Integration(_Spec):
    """Send this job's parameters, metrics, evaluation results and adapter to a tracking target of the service."""

    target: str = Field(
        min_length=1,
        max_length=64,
        description="A tracking target the operator defined (DAMA_TRACKING_TARGETS), by name; never a URI.",
        examples=["team-mlflow"],
    )
    experiment: str = Field(
        default="default",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$",
        description="Experiment (MLflow) or run group (W&B), inside this tenant's namespace: MLflow experiment "
        "'<tenant>/<experiment>', W&B project '<project_prefix><tenant>'.",
        examples=["llava-dama-sweep"],
    )


_MODEL_DESCRIPTION = (
    "Base model: a hub name, a path on the workers, or a built-in tiny model "
    "(dama/tiny-llava, dama/tiny-qwen2-vl, dama/tiny-idefics3, dama/tiny-seeing-llava)."
)
ModelName = Annotated[str, Field(min_length=1, max_length=300, examples=["llava-hf/llava-1.5-7b-hf"])]
QueueName = Annotated[
    str | None,
    Field(description="Worker queue (one per GPU class); default: the service's.", pattern=r"^[a-z0-9_.-]{1,100}$"),
]


class JobSpec(_Spec):
    """A DAMA fine-tuning job."""

    preset: Literal["paper"] | None = Field(
        default=None,
        description="A named recipe that fills the fields the request leaves out (the request's own values win; the "
        "job's spec shows the result). 'paper': the DAMA paper's released recipe for LLaVA-1.5-7B/13B: method dama, "
        "a full fine-tune (lora.enabled false, vision tower frozen, projector trained), learning_rate 5e-7, cosine "
        "schedule, warmup_ratio 0.1, weight_decay 0, epochs 4, batch_size 4 per GPU (a global batch of 16 on the "
        "preset's 4 GPUs; with gpus 8 send batch_size 2), max_length 2048, gradient checkpointing, strategy fsdp on "
        "gpus 4.",
        examples=["paper"],
    )
    model: ModelName = Field(description=_MODEL_DESCRIPTION)
    dataset_id: ObjectId = Field(
        description="Training pairs: an uploaded dataset's id.", examples=["ds_0192a0c1d2e3f4a5b6c7d8"]
    )
    method: Method = OBJECTIVE["method"].field(service=True)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    evaluation: EvaluationSpec | None = Field(default=None, description="Held-out preference evaluation.")
    hardness_scorer: str = HARDNESS["scorer"].field(service=True)
    hardness_rescale: HardnessRescale = HARDNESS["rescale"].field(service=True)
    trust_remote_code: bool = MODEL["trust_remote_code"].field(service=True)
    gpus: int = Field(default=1, ge=1, le=64, description="GPUs for this job (torchrun when > 1; see strategy).")
    strategy: Strategy = DISTRIBUTED["strategy"].field(service=True)
    queue: QueueName = None
    suffix: str | None = Field(default=None, max_length=64, description="A label for the adapter.")
    integrations: list[Integration] = Field(
        default_factory=list,
        max_length=4,
        description="Experiment tracking: the service's tracking targets this job reports to (parameters, per-step "
        "metrics, evaluation results, the adapter). A tracker failure never fails the job: a 'tracking' event "
        "says so.",
        examples=[[{"target": "team-mlflow", "experiment": "llava-dama-sweep"}]],
    )
    init_adapter: str | None = Field(
        default=None,
        pattern=INIT_ADAPTER_PATTERN,
        description="Start from an adapter of an earlier training job of this tenant on the same base model: "
        "'job_...:STEP' (a kept checkpoint of that job, running or ended) or 'job_...' (its final adapter, once "
        "it succeeded). The adapter is trained further (its LoRA shape replaces lora.r, lora.alpha and "
        "lora.target_modules); the reference of a preference method is base + that adapter, frozen; the result "
        "still loads on the plain base.",
        examples=["job_0192a0c1d2e3f4a5b6c7d8:50"],
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        preset = data.get("preset") if isinstance(data, dict) else None
        return with_preset(data, preset) if isinstance(preset, str) and preset in PRESETS else data

    @property
    def tiny_family(self) -> str | None:
        return BUILTIN_MODELS.get(self.model)

    def filter_group_problem(self) -> str | None:
        """Why the model-aware filter's group is too small (DAMA.md 2.5: floor(keep_ratio x group) < 2 with
        filtering on), naming both fixes; None when it is fine. The engine refuses the same run
        (``dama_engine.objective.loss.filter_group_problem``); both apply ``dama_settings.rules``."""
        hp = self.hyperparameters
        group = too_small_filter_group(
            method=self.method,
            keep_ratio=hp.keep_ratio,
            filter_scope=hp.filter_scope,
            batch_size=hp.batch_size,
            processes=self.gpus,
            accumulation=hp.grad_accumulation,
        )
        if group is None:
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

    @property
    def init_source(self) -> tuple[str, int | None] | None:
        """``init_adapter`` split into the source job's id and the checkpoint step (None: its final adapter)."""
        return split_init_adapter(self.init_adapter)

    @property
    def vllm_loadable(self) -> bool:
        """Whether vLLM's multi-LoRA can serve what this job trains: a LoRA adapter holding LoRA weights only. A
        trained projector is saved in full (peft's ``modules_to_save``), which vLLM refuses to load, and a full
        fine-tune is a model of its own: `dama infer` serves those (tests/engine/test_vllm_adapters.py checks this
        rule against the adapters the engine makes)."""
        return self.lora.enabled and not self.lora.train_projector


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
    """An evaluation job: a base model (and optionally a tuned adapter) scored on uploaded datasets: a preference
    dataset, a generative one, or both."""

    # The rule of _something_to_evaluate, in the OpenAPI document.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": [name], "properties": {name: {"type": "string"}}}
                for name in ("preference_dataset_id", "generative_dataset_id")
            ]
        }
    )

    model: ModelName = Field(description=_MODEL_DESCRIPTION + " With adapter_job_id, the training job's base.")
    adapter_job_id: ObjectId | None = Field(
        default=None,
        description="A succeeded training job of this tenant: its adapter is the tuned model, compared against the "
        "base. Null: evaluate the base model alone.",
        examples=["job_0192a0c1d2e3f4a5b6c7d8"],
    )
    preference_dataset_id: ObjectId | None = Field(
        default=None,
        description="Held-out preference pairs (an uploaded preference dataset): log-prob accuracy per model and, "
        "with an adapter, DPO loss / accuracy / reward margin of the tuned model against the base, per hardness "
        "bucket when the rows carry hardness scores.",
        examples=["ds_0192a0c1d2e3f4a5b6c7d8"],
    )
    generative_dataset_id: ObjectId | None = Field(
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
    max_length: int = DATA["max_length"].field(service=True, examples=[2048])
    beta: float = OBJECTIVE["beta"].field(service=True, examples=[0.1])
    batch_size: int = Field(
        default=8, gt=0, le=1024, description="Pairs per scoring pass and prompts per generation batch.", examples=[8]
    )
    trust_remote_code: bool = MODEL["trust_remote_code"].field(service=True, examples=[False])
    pope: bool = EVALUATION["pope"].field(service=True, examples=[True])
    queue: QueueName = Field(default=None, examples=[None])

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> EvaluationCreate:
        if not self.preference_dataset_id and not self.generative_dataset_id:
            raise ValueError("give preference_dataset_id and/or generative_dataset_id: there is nothing to evaluate")
        return self

    @property
    def tiny_family(self) -> str | None:
        return BUILTIN_MODELS.get(self.model)


class PairGenerationCreate(_Spec):
    """A pair generation: answers sampled from a model (base, or base + a training job's adapter) on a generative
    set, judged against each image's objects, paired into a preference dataset of the tenant."""

    model: ModelName = Field(description=_MODEL_DESCRIPTION + " With init_adapter, that training job's base.")
    generative_dataset_id: ObjectId = Field(
        description="The prompts: a generative dataset (format 'generative': image, prompt, objects, with its "
        "vocabulary.json); every sample is judged against its row's objects with that vocabulary. Or a prompt set "
        "(format 'prompts': image and prompt, with its vocabulary.json) with a judge that lists the objects.",
        examples=["ds_0192a0c1d2e3f4a5b6c7d9"],
    )
    init_adapter: str | None = Field(
        default=None,
        pattern=INIT_ADAPTER_PATTERN,
        description="Sample base + an adapter of an earlier training job of this tenant on the same base model: "
        "'job_...' (its final adapter, once it succeeded) or 'job_...:STEP' (a kept checkpoint). Null: the base.",
        examples=["job_0192a0c1d2e3f4a5b6c7d8"],
    )
    samples_per_prompt: int = Field(
        default=8,
        ge=2,
        le=1024,
        description="Answers sampled per prompt; a prompt yields a pair when one is faithful (no hallucinated "
        "object) and one hallucinates. At most the service's DAMA_PAIRS_MAX_SAMPLES_PER_PROMPT.",
        examples=[8],
    )
    temperature: float = Field(
        default=1.0, gt=0, le=10, description="Sampling temperature (> 0: pairs need varied answers).", examples=[1.0]
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.", examples=[1.0])
    max_new_tokens: int = Field(
        default=128, gt=0, le=4096, description="Most tokens per answer (EOS stops sooner).", examples=[128]
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Each sample is seeded from (seed, prompt id, sample number): a re-run makes the same samples.",
        examples=[0],
    )
    max_prompts: int | None = Field(
        default=None,
        gt=0,
        description="Use only the first N prompts of the set (null: all). The prompts used may be at most the "
        "service's DAMA_PAIRS_MAX_PROMPTS.",
        examples=[None],
    )
    prompts_per_batch: int = Field(
        default=4,
        gt=0,
        le=256,
        description="Prompts per generate call (each call answers prompts_per_batch x samples_per_prompt rows): "
        "lower it when GPU memory is short.",
        examples=[4],
    )
    judge: JudgeName | None = Field(
        default=None,
        description="For a prompt set (format 'prompts': images and prompts, no objects): a judge this service's "
        "operator defines (an unknown name is answered with the known ones) that lists each image's objects, "
        "matched onto the set's vocabulary; naming it consents to sending the set's images there. Null for a set "
        "with objects.",
        examples=[None],
    )
    dataset_name: str | None = Field(
        default=None,
        max_length=300,
        description="Name of the preference dataset made (default 'pairs from <pair generation id>').",
        examples=["round-1 pairs"],
    )
    trust_remote_code: bool = MODEL["trust_remote_code"].field(service=True, examples=[False])
    queue: QueueName = Field(default=None, examples=[None])

    @property
    def init_source(self) -> tuple[str, int | None] | None:
        """``init_adapter`` split into the source job's id and the checkpoint step (None: its final adapter)."""
        return split_init_adapter(self.init_adapter)


def _same_field(model: type[BaseModel], name: str) -> Any:
    """``model``'s field ``name`` (type rules, default, description, examples) for a field of the same meaning in
    another model: one definition, no copy to drift."""
    return copy.deepcopy(model.model_fields[name])


class LoopSampling(_Spec):
    """How each round samples its pairs (the fields of ``POST /pair-generations``)."""

    samples_per_prompt: int = _same_field(PairGenerationCreate, "samples_per_prompt")
    temperature: float = _same_field(PairGenerationCreate, "temperature")
    top_p: float = _same_field(PairGenerationCreate, "top_p")
    max_new_tokens: int = _same_field(PairGenerationCreate, "max_new_tokens")
    seed: int = _same_field(PairGenerationCreate, "seed")
    max_prompts: int | None = _same_field(PairGenerationCreate, "max_prompts")
    prompts_per_batch: int = _same_field(PairGenerationCreate, "prompts_per_batch")


class LoopTraining(_Spec):
    """How each round trains on its pairs (the fields of ``POST /jobs`` that a loop does not decide itself: the
    loop names the model, the dataset and the starting adapter)."""

    method: Method = _same_field(JobSpec, "method")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Each round's training hyper-parameters, as in POST /jobs."
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec,
        description="LoRA settings; a loop of more than one round needs LoRA (each round trains the previous "
        "round's adapter further).",
    )
    hardness_rescale: HardnessRescale = _same_field(JobSpec, "hardness_rescale")
    gpus: int = _same_field(JobSpec, "gpus")
    strategy: Strategy = _same_field(JobSpec, "strategy")


class LoopEvaluation(_Spec):
    """How each round's tuned model is evaluated on the held-out set (the fields of ``POST /evaluations``)."""

    max_samples: int | None = _same_field(EvaluationCreate, "max_samples")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="How answers are decoded on the held-out set (greedy default)."
    )
    pope: bool = _same_field(EvaluationCreate, "pope")
    batch_size: int = _same_field(EvaluationCreate, "batch_size")


class LoopCreate(_Spec):
    """A loop: rounds of sample -> train -> evaluate on the server. Round k samples pairs from round k-1's tuned
    model (round 1: the model, or base + init_adapter), trains that adapter further on them, and evaluates the
    result on the held-out set."""

    model: ModelName = Field(description=_MODEL_DESCRIPTION)
    generative_dataset_id: ObjectId = Field(
        description="The prompts each round samples from: a generative dataset (image, prompt, objects, vocabulary).",
        examples=["ds_0192a0c1d2e3f4a5b6c7d9"],
    )
    held_out_dataset_id: ObjectId = Field(
        description="A generative dataset each round's tuned model is evaluated on (CHAIR_i, CHAIR_s, coverage, "
        "POPE); keep it apart from generative_dataset_id.",
        examples=["ds_0192a0c1d2e3f4a5b6c7da"],
    )
    rounds: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Rounds to run, each a pair generation, a training job and an evaluation (at most the "
        "service's DAMA_LOOPS_MAX_ROUNDS).",
        examples=[2],
    )
    init_adapter: str | None = Field(
        default=None,
        pattern=INIT_ADAPTER_PATTERN,
        description="Start round 1 from an adapter of an earlier training job of this tenant on the same base "
        "('job_...' or 'job_...:STEP'); null: from the model itself.",
        examples=[None],
    )
    sampling: LoopSampling = Field(default_factory=LoopSampling, description="Each round's pair generation.")
    training: LoopTraining = Field(default_factory=LoopTraining, description="Each round's training job.")
    evaluation: LoopEvaluation = Field(default_factory=LoopEvaluation, description="Each round's evaluation.")
    trust_remote_code: bool = MODEL["trust_remote_code"].field(service=True, examples=[False])
    queue: QueueName = Field(default=None, examples=[None])

    @property
    def init_source(self) -> tuple[str, int | None] | None:
        return split_init_adapter(self.init_adapter)
