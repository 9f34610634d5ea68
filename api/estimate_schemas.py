"""Response bodies of ``POST /jobs/estimate`` and ``GET /jobs/estimates/{id}`` (see :mod:`api.routers.estimates`).

The figures are the engine's (``dama_engine.training.estimate_training``), typed and described here; a figure the
engine adds later is passed through as it is (``extra="allow"``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from api.schemas import TIME_EXAMPLE, JobErrorPublic, PublicModel, UtcDatetime, error_of, row_columns
from dama_client.estimate_report import PEAK_RULE
from dama_settings.names import Strategy
from jobstore.models import JobEstimate
from jobstore.redact import redact_json, strings_in
from jobstore.spec import JobSpec

_EST_ID = "est_0194b1c2d3e4a1b2c3d4e5f6"


class _Figures(PublicModel):
    model_config = ConfigDict(from_attributes=True, extra="allow")


class EstimateTokensPublic(_Figures):
    per_pair_mean: float = Field(
        description="Mean tokens of one pair (prompt with its image tokens, and both answers), over the rows measured.",
        examples=[742.5],
    )
    per_pair_max: int = Field(description="Tokens of the longest pair measured.", examples=[1130])
    layout: str | None = Field(
        default=None,
        description="How the step holds a pair, which sets its tokens: packed (prompt, chosen and rejected once), "
        "two_rows or model_logits (two rows of the prompt and the longer answer).",
        examples=["packed"],
    )
    image_tokens_per_pair: float | None = Field(
        default=None, description="Mean image tokens per pair (the processor's).", examples=[576.0]
    )
    total: int = Field(description="Tokens the whole run processes (every epoch).", examples=[3041280])


class EstimateParametersPublic(_Figures):
    total: int = Field(description="Parameters of the model (LoRA adapter included).", examples=[7063427072])
    trainable: int = Field(description="Parameters the run trains.", examples=[39976960])
    language_model: int = Field(description="Parameters of the language model.", examples=[6738415616])
    vision_tower: int = Field(description="Parameters of the vision tower.", examples=[303507456])
    projector: int = Field(description="Parameters of the multimodal projector.", examples=[21020672])


class EstimateMemoryPublic(_Figures):
    peak_gib: float = Field(
        description="Expected peak GPU memory per GPU in GiB, for the job as sent: the bytes of live tensors at the "
        f"step's peak, {PEAK_RULE} (parts_gib). The CUDA context and the allocator's cache come on top.",
        examples=[43.9],
    )
    parts_gib: dict[str, float] = Field(
        description="What the peak is made of, in GiB (3 significant digits, 2 decimals from 10): weights (their shard "
        "under fsdp; trainable ones in float32), optimizer_state (AdamW's two float32 moments per trainable "
        "parameter), gathered (fsdp's all-gathered layers), activations (of the worst micro-batch) and gradients "
        "(float32, with AdamW's temporary). They do not add up to the peak: the trainer drops gradients before "
        f"each forward and the backward frees activations as it makes gradients, so {PEAK_RULE}.",
        examples=[{"weights": 13.1, "optimizer_state": 0.6, "gathered": 0.0, "activations": 30.2, "gradients": 0.6}],
    )
    strategy: Strategy = Field(
        description="The job's strategy (ddp, or fsdp: sharded over the GPUs).", examples=["ddp"]
    )
    gradient_checkpointing: bool = Field(description="Whether the job recomputes activations.", examples=[False])
    compiled: bool = Field(description="Whether the job compiles its decoder layers.", examples=[True])
    batch_size: int = Field(description="Pairs per GPU per micro-batch.", examples=[8])
    world_size: int = Field(description="GPUs (processes) the job runs on.", examples=[1])
    dtype: str | None = Field(
        default=None,
        description="Compute dtype the figures assume (bf16 on GPUs, fp32 for built-in models).",
        examples=["bf16"],
    )


class EstimateOptionPublic(_Figures):
    strategy: Strategy = Field(description="Strategy of this alternative.", examples=["fsdp"])
    gradient_checkpointing: bool = Field(description="With gradient checkpointing.", examples=[True])
    batch_size: int = Field(description="Pairs per GPU per micro-batch.", examples=[4])
    world_size: int = Field(description="GPUs.", examples=[4])
    peak_gib: float = Field(description="Expected peak GPU memory per GPU in GiB.", examples=[19.4])
    fits: bool | None = Field(
        description="Whether it fits the workers' GPUs; null when the service does not know their memory.",
        examples=[True],
    )


class EstimateTimePublic(_Figures):
    gpu_kind: str = Field(
        description="The GPU kind the time is for (the operator's DAMA_WORKER_GPU_KIND).", examples=["H100"]
    )
    seconds: float = Field(
        description="Expected wall time in seconds: the training steps and the reference pass (compiling and the "
        "evaluation after training left out).",
        examples=[5820.0],
    )
    training_s: float | None = Field(
        default=None, description="Seconds of the training steps alone.", examples=[5400.0]
    )
    pairs_per_s: float = Field(description="Pairs per second the throughput table gives.", examples=[17.1])
    reference_pass_s: float = Field(
        description="Seconds of the reference pass before training (cached per dataset and base model).",
        examples=[420.0],
    )
    source: str = Field(
        description="Where the throughput figure comes from (a measurement, or one scaled from it).",
        examples=["measured: benchmarks/bench_train.py --llava7b"],
    )


class EstimateFiguresPublic(_Figures):
    rows: int = Field(description="Preference pairs the job trains on.", examples=[24000])
    rows_measured: int = Field(description="Rows whose token lengths were measured (a sample).", examples=[512])
    steps: int = Field(description="Optimizer steps the job will take.", examples=[1500])
    rows_over_length: int | None = Field(
        default=None,
        description="Measured rows longer than max_length (the job would refuse them while validating).",
        examples=[0],
    )
    epochs: float = Field(
        description="Passes over the training pairs (a fraction when hyperparameters.max_steps ends the run).",
        examples=[1],
    )
    tokens: EstimateTokensPublic = Field(description="Token counts, from the dataset's measured lengths.")
    parameters: EstimateParametersPublic = Field(description="Parameter counts of the model and of what trains.")
    memory: EstimateMemoryPublic = Field(description="Peak memory per GPU of the job as sent, and its parts.")
    options: list[EstimateOptionPublic] = Field(
        description="The peak per GPU under other settings (strategy, gradient checkpointing, batch size, GPUs), "
        "each with whether it fits."
    )
    time: EstimateTimePublic | None = Field(
        description="Expected wall time on the workers' GPU kind; null when the service names none "
        "(DAMA_WORKER_GPU_KIND) or the table has no figure for it."
    )
    checkpoint_gib: float = Field(description="GiB one checkpoint takes on disk.", examples=[0.5])
    fits: bool | None = Field(
        description="Whether the job as sent fits one worker GPU; null when the service does not know their "
        "memory (DAMA_WORKER_GPU_MEMORY_GB).",
        examples=[True],
    )
    gpu_memory_gib: float | None = Field(
        description="Memory of one worker GPU in GiB it was measured against; null when unknown.", examples=[80.0]
    )
    advice: list[str] = Field(
        description="What to change when it does not fit (gradient checkpointing, batch size, fsdp, more GPUs); "
        "empty when it fits.",
        examples=[["turn on hyperparameters.gradient_checkpointing: about 21 GiB per GPU"]],
    )


class EstimatePublic(PublicModel):
    id: str = Field(description="Estimate id.", examples=[_EST_ID])
    object: Literal["job_estimate"] = Field(
        default="job_estimate", description="Always 'job_estimate'.", examples=["job_estimate"]
    )
    status: Literal["queued", "running", "succeeded", "failed"] = Field(
        description="queued -> running (on a worker of the job's queue) -> succeeded (estimate set) or failed "
        "(error set).",
        examples=["succeeded"],
    )
    queue: str = Field(description="Worker queue the estimate (and the job) is sent to.", examples=["gpu"])
    estimate: EstimateFiguresPublic | None = Field(description="The figures once it succeeded; null before.")
    error: JobErrorPublic | None = Field(description="Why it failed; null otherwise.", examples=[None])
    spec: JobSpec = Field(description="The job spec estimated, as POST /jobs would accept it (defaults filled in).")
    created_at: UtcDatetime = Field(description="When it was asked for (UTC).", examples=[TIME_EXAMPLE])
    finished_at: UtcDatetime | None = Field(description="When it ended (UTC).", examples=[TIME_EXAMPLE])

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if not isinstance(value, JobEstimate):
            return value
        succeeded = value.status == "succeeded" and value.result is not None
        estimate = redact_json(value.result, strings_in(value.spec)) if succeeded else None
        return {**row_columns(value), "estimate": estimate, "error": error_of(value)}
