"""Request and response bodies. Names tell the role: ``JobPublic`` is what the API returns for one job,
``JobsPublic`` a page of them; the job's request body is :class:`jobstore.spec.JobSpec`, shared with the worker.

Conversions from job-store rows live here too (``*_public`` functions), so every route answers the same shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from jobstore.models import Dataset, Job, JobEstimate, JobEvent
from jobstore.redact import redact_json, redact_paths, strings_in
from jobstore.spec import EvaluationCreate, JobSpec, LoopCreate, PairGenerationCreate
from jobstore.states import JobStatus


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes (stored in UTC); Postgres hands back the session's zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]

DatasetFormat = Literal["auto", "trl", "rlaif_v", "openai", "generative", "prompts"]

TIME_EXAMPLE = "2025-01-31T12:00:00.123456Z"
_DATASET_ID = "ds_0194b1c2d3e4a1b2c3d4e5f6"
_JOB_ID = "job_0194b1c2d3e4a1b2c3d4e5f6"
_EVAL_ID = "eval_0194b1c2d3e4a1b2c3d4e5f6"
_PGEN_ID = "pgen_0194b1c2d3e4a1b2c3d4e5f6"


class PublicModel(BaseModel):
    """Base of the response bodies: built from job-store rows by attribute (``model_validate(row)``)."""

    model_config = ConfigDict(from_attributes=True)


def row_columns(row: Any) -> dict[str, Any]:
    """A job-store row's column values by name (what a ``_from_row`` validator starts from)."""
    return {column.key: getattr(row, column.key) for column in row.__table__.columns}


# ---- errors ---------------------------------------------------------------------------------------------------


class ErrorDetail(PublicModel):
    type: str = Field(
        description="Error class: invalid_request_error, authentication_error, not_found_error, conflict_error, "
        "request_too_large, rate_limit_error, service_unavailable_error or api_error.",
        examples=["invalid_request_error"],
    )
    code: str = Field(description="Machine-readable reason.", examples=["validation_error"])
    message: str = Field(
        description="What is wrong and how to fix it.",
        examples=["hyperparameters.learning_rate: Input should be greater than 0"],
    )
    param: str | None = Field(
        default=None,
        description="The request field at fault, as a dotted path (list items as [i]); null when none.",
        examples=["hyperparameters.learning_rate"],
    )
    errors: list[dict[str, Any]] | None = Field(
        default=None,
        description="Every problem found, when there are several: for a dataset upload "
        "{row, field, code, reason} (row is 1-based); for a request {param, code, message}.",
        examples=[[{"row": 2, "field": "images[0]", "code": "image_not_found", "reason": "images/x.png not found"}]],
    )


class ErrorResponse(PublicModel):
    error: ErrorDetail = Field(description="The error.")


# ---- pagination -----------------------------------------------------------------------------------------------

ItemT = TypeVar("ItemT")


def next_cursor(rows: Sequence[Any], *, has_more: bool) -> str | None:
    """The ``?after=`` of the page after ``rows``: its last row's id, or None on the last page."""
    return str(rows[-1].id) if has_more and rows else None


class Page(PublicModel, Generic[ItemT]):
    """One page of a list: every list route answers this shape (a subclass names the item type)."""

    data: list[ItemT] = Field(description="This page's items, in the list's order (see the route).")
    has_more: bool = Field(description="Whether another page follows this one.", examples=[False])
    next_cursor: str | None = Field(
        default=None, description="Pass as ?after= to get the next page; null on the last page.", examples=[None]
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """A named page (``JobsPublic``) describes its ``data`` with its docstring ("Jobs, newest first."): what
        is listed and in which order, in the field a client reads."""
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__doc__ and cls.__doc__ != Page.__doc__ and "data" in cls.__pydantic_fields__:
            cls.__pydantic_fields__["data"].description = inspect.cleandoc(cls.__doc__)
            cls.model_rebuild(force=True)

    @classmethod
    def of(cls, rows: Sequence[Any], *, has_more: bool = False, cursor: str | None = None) -> Self:
        """The page of job-store ``rows`` (each item built with ``model_validate``); ``cursor`` overrides the
        default (the last row's id when more follow)."""
        cursor = cursor if cursor is not None else next_cursor(rows, has_more=has_more)
        page = {"data": list(rows), "has_more": has_more, "next_cursor": cursor}
        return cls.model_validate(page, from_attributes=True)


# ---- datasets -------------------------------------------------------------------------------------------------


class RowErrorPublic(PublicModel):
    row: int = Field(description="1-based row number (the line number for JSONL).", examples=[2])
    field: str | None = Field(
        description="The field at fault, as written in the uploaded file; null for the row as a whole.",
        examples=["images[0]"],
    )
    code: str = Field(description="Machine-readable problem.", examples=["image_not_found"])
    reason: str = Field(description="What is wrong.", examples=["images/0001.png not found in the dataset"])


class ValidationReportPublic(PublicModel):
    model_config = ConfigDict(extra="ignore")

    ok: bool = Field(description="True when every row passed every check.", examples=[True])
    format: str | None = Field(default=None, description="The format the rows were read as.", examples=["trl"])
    total_rows: int = Field(description="Rows read.", examples=[512])
    valid_rows: int = Field(description="Rows without any problem.", examples=[512])
    invalid_rows: int = Field(default=0, description="Rows with at least one problem.", examples=[0])
    errors: list[RowErrorPublic] = Field(default_factory=list, description="Problems found, in row order.")
    errors_omitted: int = Field(default=0, description="Problems found beyond those listed.", examples=[0])


class DatasetUpload(BaseModel):
    """The multipart form of ``POST /datasets`` (documentation only: the route streams the body itself)."""

    file: bytes = Field(
        description="A data file (.jsonl, .json, .parquet; images embedded as base64 or data URIs) or a .zip / "
        ".tar / .tar.gz archive holding one data file and the images it references by relative path. A generative "
        "evaluation set is an archive of a JSONL file (rows {image, prompt, objects}), vocabulary.json (object "
        "names and synonyms) and the images.",
    )
    name: str | None = Field(
        default=None, max_length=300, description="A label; default: the file name.", examples=["shapes-v1"]
    )
    format: DatasetFormat = Field(
        default="auto",
        description="Row format: trl, rlaif_v, openai, generative (an evaluation set for POST /evaluations) or "
        "prompts (images and prompts without objects, for POST /pair-generations with a judge); auto tells them "
        "apart by the rows' columns (beside a vocabulary.json, rows with objects and no chosen: generative; rows "
        "with image and prompt, none with objects or chosen: prompts).",
        examples=["auto"],
    )


class DatasetPublic(PublicModel):
    id: str = Field(description="Dataset id.", examples=[_DATASET_ID])
    object: Literal["dataset"] = Field(default="dataset", description="Always 'dataset'.", examples=["dataset"])
    name: str = Field(description="Label given at upload (default: the file name).", examples=["shapes-v1"])
    format: str = Field(
        description="Row format the data was read as: trl, rlaif_v or openai (preference pairs), or generative (a "
        "generative evaluation set: image, prompt, objects, with its vocabulary).",
        examples=["trl"],
    )
    row_count: int = Field(
        description="Preference pairs in the dataset (samples, for a generative set).", examples=[512]
    )
    image_count: int = Field(description="Images referenced by the rows.", examples=[512])
    size_bytes: int = Field(
        description="Bytes stored: the data file and the images rows use (not the upload: an archive's other "
        "members are not kept). Counts against the tenant's storage quota.",
        examples=[1048576],
    )
    sha256: str = Field(
        description="SHA-256 of the upload as received (hex).",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
    )
    validation: ValidationReportPublic = Field(description="The validation report of the upload.")
    created_at: UtcDatetime = Field(description="Upload time (UTC).", examples=[TIME_EXAMPLE])

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if not isinstance(value, Dataset):
            return value
        report = dict(value.report or {})
        validation = report.get("report", report)  # stored: the check's whole output, or the report alone
        return {**row_columns(value), "validation": redact_json(validation)}


class DatasetsPublic(Page[DatasetPublic]):
    """Datasets, newest first."""


# ---- jobs -----------------------------------------------------------------------------------------------------


class JobErrorPublic(PublicModel):
    kind: Literal["user_error", "system_error"] = Field(
        description="user_error: the spec or data must change; system_error: a fault on our side (retry).",
        examples=["user_error"],
    )
    message: str = Field(
        description="What went wrong.", examples=["row 12: 2310 tokens with image tokens > max_length 2048"]
    )


class JobPublic(PublicModel):
    id: str = Field(description="Job id.", examples=[_JOB_ID])
    object: Literal["job"] = Field(default="job", description="Always 'job'.", examples=["job"])
    kind: str = Field(description="What the job does; 'training' for fine-tuning jobs.", examples=["training"])
    status: JobStatus = Field(
        description="queued, running, cancelling, succeeded, failed or cancelled.", examples=["running"]
    )
    stage: str | None = Field(
        description="Current stage while running: building_model (a built-in model built on first use), "
        "validating, loading_model, scoring, reference, training, evaluating, exporting. Null once the job ended "
        "(its events keep every stage).",
        examples=["training"],
    )
    step: int = Field(description="Optimizer steps done.", examples=[120])
    total_steps: int | None = Field(description="Optimizer steps planned, once known.", examples=[400])
    progress: float = Field(description="Share of the job done, 0 to 1.", examples=[0.3])
    percent: float = Field(description="Progress in percent, 0 to 100.", examples=[30.0])
    eta_seconds: float | None = Field(description="Estimated seconds left; null when unknown.", examples=[840.0])
    error: JobErrorPublic | None = Field(description="Why the job failed; null otherwise.", examples=[None])
    attempts: int = Field(description="Runs started (a job whose worker died is re-run).", examples=[1])
    dataset_id: str | None = Field(
        description="Training dataset; null if it was deleted after the job ended.", examples=[_DATASET_ID]
    )
    queue: str = Field(description="Worker queue the job was sent to.", examples=["gpu"])
    spec: JobSpec = Field(description="The job spec as accepted (defaults filled in).")
    result: dict[str, Any] | None = Field(
        description="Final metrics once the job succeeded.",
        examples=[{"eval/reward_accuracy": 0.91, "train/loss": 0.41}],
    )
    created_at: UtcDatetime = Field(description="When the job was created (UTC).", examples=[TIME_EXAMPLE])
    started_at: UtcDatetime | None = Field(description="When a worker first started it.", examples=[TIME_EXAMPLE])
    finished_at: UtcDatetime | None = Field(description="When it reached a final status.", examples=[None])

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if not isinstance(value, Job):
            return value
        return {**_job_columns(value), "result": redact_json(value.result, strings_in(value.spec))}


class JobsPublic(Page[JobPublic]):
    """Jobs, newest first."""


def error_of(run: Job | JobEstimate) -> dict[str, Any] | None:
    """A failed run's error (``JobErrorPublic``), worker paths redacted but those its spec names; None otherwise."""
    if run.error_kind is None:
        return None
    return {"kind": run.error_kind, "message": redact_paths(run.error_message or "", strings_in(run.spec))}


def _job_columns(job: Job) -> dict[str, Any]:
    """What a job row and an evaluation row share in their public form: progress clamped to 0-1 with its
    percent, the error with paths redacted, counters that are never null."""
    progress = max(0.0, min(1.0, float(job.progress or 0.0)))
    return {
        **row_columns(job),
        "step": job.step or 0,
        "progress": progress,
        "percent": round(progress * 100, 2),
        "error": error_of(job),
        "attempts": job.attempts or 0,
    }


class EvaluationPublic(PublicModel):
    id: str = Field(description="Evaluation id.", examples=[_EVAL_ID])
    object: Literal["evaluation"] = Field(
        default="evaluation", description="Always 'evaluation'.", examples=["evaluation"]
    )
    status: JobStatus = Field(
        description="queued, running, cancelling, succeeded, failed or cancelled.", examples=["running"]
    )
    stage: str | None = Field(
        description="Current stage while running: validating, loading_model, scoring, log_probs, generating, writing.",
        examples=["generating"],
    )
    progress: float = Field(description="Share of the evaluation done, 0 to 1.", examples=[0.5])
    percent: float = Field(description="Progress in percent, 0 to 100.", examples=[50.0])
    eta_seconds: float | None = Field(description="Estimated seconds left; null when unknown.", examples=[120.0])
    error: JobErrorPublic | None = Field(description="Why the evaluation failed; null otherwise.", examples=[None])
    attempts: int = Field(description="Runs started (an evaluation whose worker died is re-run).", examples=[1])
    queue: str = Field(description="Worker queue it was sent to.", examples=["gpu"])
    spec: EvaluationCreate = Field(description="The request as accepted (defaults filled in).")
    metrics: dict[str, Any] | None = Field(
        description="Once succeeded: the results. 'generative' (per model 'base' / 'tuned': chair_s, chair_i, "
        "coverage, hallucination_rate, mean_length and their counts) and 'preference' (per model log-prob "
        "statistics, and with an adapter 'implicit_reward': DPO loss, accuracy, margin, overall and per hardness "
        "bucket); null before.",
        examples=[
            {
                "model": "llava-hf/llava-1.5-7b-hf",
                "generative": {
                    "samples": 64,
                    "base": {"chair_s": 0.41, "chair_i": 0.18, "coverage": 0.62, "hallucination_rate": 0.41},
                    "tuned": {"chair_s": 0.27, "chair_i": 0.11, "coverage": 0.60, "hallucination_rate": 0.27},
                },
                "preference": {"pairs": 128, "implicit_reward": {"overall": {"accuracy": 0.81, "margin": 0.42}}},
            }
        ],
    )
    created_at: UtcDatetime = Field(description="When it was created (UTC).", examples=[TIME_EXAMPLE])
    started_at: UtcDatetime | None = Field(description="When a worker first started it.", examples=[TIME_EXAMPLE])
    finished_at: UtcDatetime | None = Field(description="When it reached a final status.", examples=[None])

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if not isinstance(value, Job):
            return value
        succeeded = value.status == JobStatus.succeeded.value
        results = (value.result or {}).get("results")
        metrics = redact_json(results, strings_in(value.spec)) if succeeded else None
        return {**_job_columns(value), "metrics": metrics}


class EvaluationsPublic(Page[EvaluationPublic]):
    """Evaluations, newest first."""


class PairGenerationPublic(PublicModel):
    id: str = Field(description="Pair generation id.", examples=[_PGEN_ID])
    object: Literal["pair_generation"] = Field(
        default="pair_generation", description="Always 'pair_generation'.", examples=["pair_generation"]
    )
    status: JobStatus = Field(
        description="queued, running, cancelling, succeeded, failed or cancelled.", examples=["running"]
    )
    stage: str | None = Field(
        description="Current stage while running: validating, loading_model, generating, writing.",
        examples=["generating"],
    )
    step: int = Field(description="Prompts sampled and judged so far.", examples=[48])
    total_steps: int | None = Field(description="Prompts to sample, once known.", examples=[200])
    progress: float = Field(description="Share of the prompts done, 0 to 1.", examples=[0.24])
    percent: float = Field(description="Progress in percent, 0 to 100.", examples=[24.0])
    eta_seconds: float | None = Field(description="Estimated seconds left; null when unknown.", examples=[310.0])
    error: JobErrorPublic | None = Field(
        description="Why it failed; null otherwise. No prompt yielding a pair is a user_error saying what was tried "
        "and what to change.",
        examples=[None],
    )
    attempts: int = Field(description="Runs started (one whose worker died is re-run).", examples=[1])
    queue: str = Field(description="Worker queue it was sent to.", examples=["gpu"])
    spec: PairGenerationCreate = Field(description="The request as accepted (defaults filled in).")
    dataset_id: str | None = Field(
        description="Once succeeded: the preference dataset made (TRL format, images stored once, chosen_score and "
        "rejected_score per pair), usable as a job's dataset_id; null before.",
        examples=[_DATASET_ID],
    )
    report: dict[str, Any] | None = Field(
        description="Once succeeded: prompts tried, pairs made, samples (faithful, hallucinating, empty), "
        "hallucinated objects per sample as a histogram, the most common hallucinated objects, mean scores, the "
        "sampling settings and samples per second; null before.",
        examples=[
            {
                "prompts_tried": 200,
                "pairs": 131,
                "samples": 1600,
                "hallucinated_objects_per_sample": {"0": 912, "1": 488, "2": 200},
                "most_common_hallucinated_objects": [{"object": "car", "samples": 211}],
            }
        ],
    )
    created_at: UtcDatetime = Field(description="When it was created (UTC).", examples=[TIME_EXAMPLE])
    started_at: UtcDatetime | None = Field(description="When a worker first started it.", examples=[TIME_EXAMPLE])
    finished_at: UtcDatetime | None = Field(description="When it reached a final status.", examples=[None])

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if not isinstance(value, Job):
            return value
        result = (value.result or {}) if value.status == JobStatus.succeeded.value else {}
        report = redact_json(result.get("report"), strings_in(value.spec))
        return {**_job_columns(value), "dataset_id": result.get("dataset_id"), "report": report}


class PairGenerationsPublic(Page[PairGenerationPublic]):
    """Pair generations, newest first."""


_LOOP_ID = "loop_0194b1c2d3e4a1b2c3d4e5f6"
# What each kind of run a loop starts is called in the API (and so where to GET it).
RUN_OBJECTS = {"pair_generation": "pair_generation", "training": "job", "evaluation": "evaluation"}


class LoopRunPublic(PublicModel):
    """One run of a round, in short (its own route has the rest: /pair-generations, /jobs, /evaluations)."""

    id: str = Field(description="The run's id.", examples=[_PGEN_ID])
    object: Literal["pair_generation", "job", "evaluation"] = Field(
        description="What it is (and so where to GET it).", examples=["pair_generation"]
    )
    status: JobStatus = Field(description="Its status.", examples=["succeeded"])
    stage: str | None = Field(description="Its current stage while it runs.", examples=[None])
    percent: float = Field(description="Its progress in percent.", examples=[100.0])
    attempts: int = Field(description="Runs started (re-run after a worker died).", examples=[1])

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if not isinstance(value, Job):
            return value
        return {**_job_columns(value), "object": RUN_OBJECTS[value.kind]}


class LoopRoundPublic(PublicModel):
    round: int = Field(description="1, 2, ...", examples=[1])
    status: Literal["pending", "running", "succeeded", "failed", "cancelled"] = Field(
        description="pending (not started), running (a stage is queued or running), succeeded (evaluated), failed "
        "or cancelled (a stage ended so).",
        examples=["succeeded"],
    )
    pair_generation: LoopRunPublic | None = Field(description="Its pair generation, once started.")
    job: LoopRunPublic | None = Field(description="Its training job, once started.")
    evaluation: LoopRunPublic | None = Field(description="Its evaluation, once started.")
    pairs: int | None = Field(description="Pairs its pair generation made.", examples=[131])
    dataset_id: str | None = Field(description="The preference dataset of those pairs.", examples=[_DATASET_ID])
    metrics: dict[str, Any] | None = Field(
        description="Once evaluated: the tuned model's held-out chair_i, chair_s, coverage, hallucination_rate, "
        "pope_f1 (mean over POPE's splits) and pope_f1_by_split.",
        examples=[{"chair_i": 0.186, "chair_s": 0.33, "coverage": 0.81, "pope_f1": 0.87}],
    )


class LoopPublic(PublicModel):
    id: str = Field(description="Loop id.", examples=[_LOOP_ID])
    object: Literal["loop"] = Field(default="loop", description="Always 'loop'.", examples=["loop"])
    status: JobStatus = Field(
        description="running (from its creation: its first run is queued with it), cancelling, succeeded, failed "
        "(a run failed: error names it) or cancelled.",
        examples=["running"],
    )
    stage: str | None = Field(
        description="The current round and stage ('round 2: pairs').", examples=["round 2: pairs"]
    )
    step: int = Field(description="Stages done (three per round).", examples=[3])
    total_steps: int = Field(description="Stages in all: 3 x rounds.", examples=[6])
    progress: float = Field(description="Stages done plus the current one's share, over all, 0 to 1.", examples=[0.55])
    percent: float = Field(description="Progress in percent, 0 to 100.", examples=[55.0])
    error: JobErrorPublic | None = Field(description="Why the loop failed (which run, and why); null otherwise.")
    spec: LoopCreate = Field(description="The request as accepted (defaults filled in, the queue resolved).")
    base: dict[str, Any] | None = Field(
        description="The plain model's held-out figures (round 1's evaluation), to compare each round with.",
        examples=[{"chair_i": 0.285, "chair_s": 0.48, "coverage": 0.72, "pope_f1": 0.84}],
    )
    rounds: list[LoopRoundPublic] = Field(description="Every round, those not started yet included.")
    created_at: UtcDatetime = Field(description="When it was created (UTC).", examples=[TIME_EXAMPLE])
    finished_at: UtcDatetime | None = Field(description="When it reached a final status.", examples=[None])

    @classmethod
    def of(cls, loop: Job, rounds: Sequence[Any], *, progress: float) -> LoopPublic:
        """The loop's row with its rounds (``api.services.loops.RoundView``: round, runs by stage, metrics)."""
        columns = _job_columns(loop)
        public_rounds = []
        for view in rounds:
            runs = view.runs
            pairs_run = runs.get("pairs")
            made = (pairs_run.result or {}) if pairs_run is not None and pairs_run.status == "succeeded" else {}
            statuses = [run.status for run in runs.values()]
            if not runs:
                state = "pending"
            elif view.metrics is not None:
                state = "succeeded"
            elif "failed" in statuses:
                state = "failed"
            elif "cancelled" in statuses:
                state = "cancelled"
            else:
                state = "running"
            public_rounds.append(
                {
                    "round": view.round,
                    "status": state,
                    "pair_generation": pairs_run,
                    "job": runs.get("training"),
                    "evaluation": runs.get("evaluation"),
                    "pairs": (made.get("report") or {}).get("pairs"),
                    "dataset_id": made.get("dataset_id"),
                    "metrics": (view.metrics or {}).get("tuned"),
                }
            )
        return cls.model_validate(
            {
                **columns,
                "total_steps": loop.total_steps or 0,
                "progress": progress,
                "percent": round(progress * 100, 2),
                "base": (loop.result or {}).get("base"),
                "rounds": public_rounds,
            }
        )


class LoopsPublic(Page[LoopPublic]):
    """Loops, newest first."""


class EventPublic(PublicModel):
    seq: int = Field(description="Position in the job's event log (1, 2, ...); the SSE event id.", examples=[7])
    type: str = Field(
        description="Event kind: status, stage, log, checkpoint, evaluation, tracking (an experiment tracker "
        "stopped; the job goes on), ...",
        examples=["stage"],
    )
    message: str = Field(description="Human-readable text.", examples=["training: 400 steps"])
    data: dict[str, Any] | None = Field(description="Structured details.", examples=[{"stage": "training"}])
    created_at: UtcDatetime = Field(description="When it happened (UTC).", examples=[TIME_EXAMPLE])

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if not isinstance(value, JobEvent):
            return value
        return {**row_columns(value), "message": redact_paths(value.message), "data": redact_json(value.data)}


class EventsPublic(Page[EventPublic]):
    """Events in seq order."""

    next_cursor: str | None = Field(
        default=None,
        description="The last seq seen (this page's last, else the ?after= given): pass it as ?after= for the next "
        "page, or later to poll for new events (the log only grows).",
        examples=["7"],
    )


# A [step, value] pair. Documented as two numbers rather than with prefixItems, which OpenAPI 3.1 allows but
# common tools (schemathesis among them) still read as the old tuple form and reject.
MetricPoint = Annotated[
    tuple[int, float],
    WithJsonSchema({"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}),
]


class MetricsPublic(PublicModel):
    job_id: str = Field(description="The job.", examples=[_JOB_ID])
    series: dict[str, list[MetricPoint]] = Field(
        description="Per metric key, [step, value] pairs in step order.",
        examples=[{"loss": [[1, 0.69], [2, 0.66]], "reward_margin": [[1, 0.0], [2, 0.05]]}],
    )


class CheckpointPublic(PublicModel):
    id: str = Field(description="Checkpoint id.", examples=["ckpt_0194b1c2d3e4a1b2c3d4e5f6"])
    object: Literal["checkpoint"] = Field(
        default="checkpoint", description="Always 'checkpoint'.", examples=["checkpoint"]
    )
    job_id: str = Field(description="The job that saved it.", examples=[_JOB_ID])
    step: int = Field(description="Optimizer step it was saved at.", examples=[50])
    created_at: UtcDatetime = Field(description="When it was saved (UTC).", examples=[TIME_EXAMPLE])


class CheckpointsPublic(Page[CheckpointPublic]):
    """Checkpoints in step order."""


# ---- models ---------------------------------------------------------------------------------------------------


class ModelFamilyPublic(PublicModel):
    name: str = Field(description="Family name.", examples=["llava"])
    model_types: list[str] = Field(
        description="transformers model_type values in this family.", examples=[["llava", "llava_next"]]
    )
    language_model_prefix: str = Field(
        description="Module path of the language model inside the model.", examples=["model.language_model"]
    )
    default_lora_target_modules: list[str] = Field(
        description="Default LoRA targets: these projections inside the language model (never the vision tower).",
        examples=[["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]],
    )
    default_lora_target_regex: str = Field(
        description="The same targets as a full-match regex over module names (peft target_modules).",
        examples=[r"model\.language_model\.(?:.*\.)?(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"],
    )
    vision_tower_prefixes: list[str] = Field(
        description="Vision encoder modules (frozen).", examples=[["model.vision_tower"]]
    )
    projector_prefixes: list[str] = Field(
        description="Multimodal projector modules (trained with lora.train_projector).",
        examples=[["model.multi_modal_projector"]],
    )


class TinyModelPublic(PublicModel):
    name: str = Field(description="Use as the job's model.", examples=["dama/tiny-llava"])
    family: str = Field(description="Its family.", examples=["llava"])
    description: str = Field(
        description="What it is.", examples=["A randomly initialised tiny LLaVA built on the worker (CPU-friendly)."]
    )


class ModelCatalogPublic(PublicModel):
    families: list[ModelFamilyPublic] = Field(description="Supported model families.")
    tiny_models: list[TinyModelPublic] = Field(description="Built-in tiny models for trying the service on a CPU.")
    hardness_scorer: str | None = Field(
        default=None,
        description="The CLIP scorer (hub id or folder on the workers) that computes data hardness for datasets "
        "whose rows carry none (the operator's DAMA_HARDNESS_SCORER). Null: none is configured, so methods dama and "
        "dama_data need rows with hardness, or chosen_score and rejected_score.",
        examples=["openai/clip-vit-large-patch14-336"],
    )


# ---- health ---------------------------------------------------------------------------------------------------


class HealthPublic(PublicModel):
    status: Literal["ok"] = Field(description="Always 'ok' when the process answers.", examples=["ok"])


class ReadyPublic(PublicModel):
    status: Literal["ready"] = Field(description="'ready' when every dependency answered.", examples=["ready"])
    checks: dict[str, str] = Field(
        description="Each dependency and its state.", examples=[{"database": "ok", "broker": "ok"}]
    )


# ---- merged exports -------------------------------------------------------------------------------------------

_EXPORT_ID = "exp_0194b1c2d3e4a1b2c3d4e5f6"


class ExportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: as typed in the document, never coerced

    format: Literal["merged"] = Field(
        description="merged: the adapter folded into the base model's weights (safetensors, processor files, model "
        "card): a plain transformers model that needs no peft to serve.",
        examples=["merged"],
    )


class ExportPublic(PublicModel):
    id: str = Field(description="Export id.", examples=[_EXPORT_ID])
    object: Literal["export"] = Field(default="export", description="Always 'export'.", examples=["export"])
    job_id: str = Field(description="The training job whose adapter is exported.", examples=[_JOB_ID])
    format: str = Field(description="The export's format.", examples=["merged"])
    status: Literal["queued", "running", "succeeded", "failed"] = Field(
        description="queued -> running (on a worker) -> succeeded (downloadable) or failed.", examples=["succeeded"]
    )
    error_message: str | None = Field(description="Why it failed (failed only).", examples=[None])
    size_bytes: int | None = Field(description="Size of the archive (succeeded only).", examples=[26843545600])
    sha256: str | None = Field(
        description="SHA-256 of the archive, hex (succeeded only).", examples=["9f86d081884c7d659a2feaa0c55ad015"]
    )
    created_at: UtcDatetime = Field(description="When it was asked for (UTC).", examples=[TIME_EXAMPLE])
    finished_at: UtcDatetime | None = Field(description="When it ended (UTC).", examples=[TIME_EXAMPLE])


class ExportsPublic(Page[ExportPublic]):
    """The job's exports, oldest first."""
