"""``/evaluations``: score a base model (and a training job's adapter against it) on uploaded datasets.

An evaluation is a job of kind ``evaluation`` (id prefix ``eval_``): created, enqueued by task name, claimed, run,
cancelled and recovered exactly like a training job, and never visible under ``/jobs`` (nor a training job here).
Outputs: the results as ``metrics``, the per-sample generations (``/outputs``, JSONL) and the chart (``/chart``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse

from api.deps import After, CurrentTenant, Limit, Services, ServicesDep, SessionDep
from api.downloads import artifact_response
from api.errors import ApiError
from api.routers.job_outputs import EventsAfter, EventsLimit, events_response
from api.routers.jobs import (
    STORAGE_FULL,
    IdempotencyKey,
    cancel_or_conflict,
    check_dataset,
    get_tenant_job,
    submit_job,
)
from api.schemas import ErrorResponse, EvaluationPublic, EvaluationsPublic, EventsPublic, evaluation_public
from jobstore import repository
from jobstore.models import Job
from jobstore.spec import EvaluationCreate, JobSpec
from jobstore.states import JobStatus

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/evaluations", tags=["evaluations"])

ENDPOINT = "POST /evaluations"
KIND = repository.EVALUATION

UNAUTHORIZED: dict[str, Any] = {"model": ErrorResponse, "description": "Missing or invalid API key."}
NOT_FOUND: dict[str, Any] = {"model": ErrorResponse, "description": "No such evaluation for this tenant."}
NOT_READY: dict[str, Any] = {"model": ErrorResponse, "description": "The evaluation has not succeeded (yet)."}

# ?file= of GET /evaluations/{id}/outputs -> the artifact kind the worker registered.
OUTPUT_KINDS = {"generations": "eval_outputs", "pairs": "eval_pairs"}


def _tenant_evaluation(session: Any, *, tenant_id: str, evaluation_id: str) -> Job:
    return get_tenant_job(session, tenant_id=tenant_id, job_id=evaluation_id, kind=KIND)


def _check_adapter_job(session: Any, *, tenant_id: str, spec: EvaluationCreate) -> None:
    """The adapter must come from a succeeded training job of this tenant, trained on ``spec.model``."""
    assert spec.adapter_job_id is not None
    job = repository.get_job(session, job_id=spec.adapter_job_id, tenant_id=tenant_id, kind=repository.TRAINING)
    if job is None:
        raise ApiError(404, "job_not_found", f"no training job with id {spec.adapter_job_id!r}", param="adapter_job_id")
    if job.status != JobStatus.succeeded.value:
        raise ApiError(
            409,
            "adapter_not_ready",
            f"adapter_job_id: job {job.id} is {job.status}; its adapter can be evaluated once it has succeeded",
            param="adapter_job_id",
        )
    trained_on = JobSpec.model_validate(job.spec).model
    if trained_on != spec.model:
        raise ApiError(
            422,
            "adapter_model_mismatch",
            f"adapter_job_id: job {job.id} trained an adapter for {trained_on!r}, not {spec.model!r}; "
            "set model to the training job's base model",
            param="model",
        )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create an evaluation",
    description="Scores the base model, and with adapter_job_id the tuned model against it, on a preference "
    "dataset (log-prob accuracy; DPO loss, accuracy and reward margin per hardness bucket) and/or a generative "
    "dataset (answers generated and scored for object hallucination: CHAIR-s, CHAIR-i, coverage). Records the "
    "evaluation as queued and sends it to a worker queue. Returns 200 instead of 201 when an Idempotency-Key "
    "replays an earlier request.",
    responses={
        200: {"model": EvaluationPublic, "description": "Replayed: the evaluation an earlier request created."},
        401: UNAUTHORIZED,
        403: STORAGE_FULL,
        429: {
            "model": ErrorResponse,
            "description": "rate_limit_exceeded (the tenant's request rate), or too_many_active_jobs (the tenant "
            "already has DAMA_MAX_ACTIVE_JOBS queued or running jobs); Retry-After says when to retry.",
        },
        404: {
            "model": ErrorResponse,
            "description": "A dataset or adapter_job_id is not this tenant's; param names the field.",
        },
        409: {
            "model": ErrorResponse,
            "description": "adapter_job_id has not succeeded, or the Idempotency-Key was reused with another body.",
        },
        422: {
            "model": ErrorResponse,
            "description": "Invalid request (no dataset given, a dataset of the wrong kind, an adapter trained on "
            "another model); param names the field.",
        },
    },
)
def create_evaluation(
    spec: EvaluationCreate,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> EvaluationPublic:
    tenant_id = tenant.id

    def check() -> None:
        if spec.preference_dataset_id:
            check_dataset(
                session, tenant_id=tenant_id, dataset_id=spec.preference_dataset_id, param="preference_dataset_id"
            )
        if spec.generative_dataset_id:
            check_dataset(
                session,
                tenant_id=tenant_id,
                dataset_id=spec.generative_dataset_id,
                param="generative_dataset_id",
                generative=True,
            )
        if spec.adapter_job_id:
            _check_adapter_job(session, tenant_id=tenant_id, spec=spec)

    job = submit_job(
        session,
        services,
        response,
        tenant_id=tenant_id,
        body=spec.model_dump(mode="json"),
        kind=KIND,
        endpoint=ENDPOINT,
        dataset_id=spec.preference_dataset_id or spec.generative_dataset_id,
        queue=spec.queue,
        idempotency_key=idempotency_key,
        check=check,
    )
    return evaluation_public(job)


@router.get("", summary="List evaluations", responses={401: UNAUTHORIZED})
def list_evaluations(
    session: SessionDep,
    tenant: CurrentTenant,
    status_filter: Annotated[
        JobStatus | None, Query(alias="status", description="Only evaluations in this status.", examples=["running"])
    ] = None,
    limit: Limit = 20,
    after: After = None,
) -> EvaluationsPublic:
    rows, has_more = repository.list_jobs(
        session,
        tenant_id=tenant.id,
        limit=limit,
        after=after,
        status=status_filter.value if status_filter is not None else None,
        kind=KIND,
    )
    return EvaluationsPublic(
        data=[evaluation_public(row) for row in rows],
        has_more=has_more,
        next_cursor=rows[-1].id if has_more and rows else None,
    )


@router.get("/{evaluation_id}", summary="Get an evaluation", responses={401: UNAUTHORIZED, 404: NOT_FOUND})
def get_evaluation(evaluation_id: str, session: SessionDep, tenant: CurrentTenant) -> EvaluationPublic:
    return evaluation_public(_tenant_evaluation(session, tenant_id=tenant.id, evaluation_id=evaluation_id))


@router.post(
    "/{evaluation_id}/cancel",
    summary="Cancel an evaluation",
    description="A queued evaluation is cancelled at once; a running one becomes 'cancelling' and stops at its "
    "next progress report. Cancelling one that is already cancelling is a no-op.",
    responses={
        401: UNAUTHORIZED,
        404: NOT_FOUND,
        409: {"model": ErrorResponse, "description": "The evaluation already ended."},
    },
)
def cancel_evaluation(evaluation_id: str, session: SessionDep, tenant: CurrentTenant) -> EvaluationPublic:
    job = _tenant_evaluation(session, tenant_id=tenant.id, evaluation_id=evaluation_id)
    cancel_or_conflict(session, job, noun="evaluation")
    return evaluation_public(job)


@router.get(
    "/{evaluation_id}/events",
    summary="List or follow an evaluation's events",
    description="Events in order, a page at a time (`?after=<seq>&limit=`), as for jobs. With `Accept: "
    "text/event-stream`, follows the evaluation live (`id: <seq>`, `event: <type>`, `data: <EventPublic JSON>`, "
    "resuming after `Last-Event-ID`); the stream ends once it reached a final status.",
    response_model=EventsPublic,
    responses={
        200: {
            "description": "A page of events, or (Accept: text/event-stream) the live stream.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        401: UNAUTHORIZED,
        404: NOT_FOUND,
    },
)
def list_evaluation_events(
    evaluation_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    after: EventsAfter = 0,
    limit: EventsLimit = 100,
) -> Any:
    _tenant_evaluation(session, tenant_id=tenant.id, evaluation_id=evaluation_id)
    return events_response(
        evaluation_id,
        request,
        session,
        services,
        after=after,
        limit=limit,
        last_event_id=request.headers.get("last-event-id"),
    )


def _succeeded_artifact(session: Any, services: Services, job: Job, kind: str, what: str) -> tuple[Path, str]:
    if job.status != JobStatus.succeeded.value:
        raise ApiError(
            409, "evaluation_not_ready", f"the evaluation is {job.status}; its {what} is available once it succeeded"
        )
    artifact = repository.get_artifact(session, job_id=job.id, kind=kind)
    if artifact is None:
        raise ApiError(404, "output_not_found", f"this evaluation has no {what}")
    path = services.artifacts.local_path(artifact.path)
    if not services.artifacts.exists(path):
        raise ApiError(404, "output_not_found", f"the evaluation succeeded but its {what} is missing from the store")
    return path, artifact.sha256


@router.get(
    "/{evaluation_id}/outputs",
    summary="Download an evaluation's per-sample outputs",
    description="JSONL, streamed, once the evaluation succeeded. `file=generations` (default): one line per "
    "generative sample: id, image, prompt, true objects, and per model (`base`, `tuned`) the response with its "
    "mentioned, hallucinated, covered and missed objects. `file=pairs`: one line per preference pair: hardness, "
    "bucket, log-probs per model, reward margin. `X-Content-SHA256` carries the file's SHA-256.",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The JSONL file.",
            "content": {"application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}},
        },
        401: UNAUTHORIZED,
        404: {"model": ErrorResponse, "description": "No such evaluation, or it has no such outputs."},
        409: NOT_READY,
    },
)
def download_outputs(
    evaluation_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    file: Annotated[
        Literal["generations", "pairs"],
        Query(description="generations (generative set) or pairs (preference set).", examples=["generations"]),
    ] = "generations",
) -> Response:
    job = _tenant_evaluation(session, tenant_id=tenant.id, evaluation_id=evaluation_id)
    path, sha256 = _succeeded_artifact(session, services, job, OUTPUT_KINDS[file], f"{file} output")
    return artifact_response(
        services.artifacts,
        path,
        request=request,
        mode=services.settings.download_mode,
        media_type="application/x-ndjson",
        filename=f"{evaluation_id}-{file}.jsonl",
        headers={"X-Content-SHA256": sha256},
    )


@router.get(
    "/{evaluation_id}/chart",
    summary="Download an evaluation's chart",
    description="A PNG: CHAIR metrics base against tuned, preference accuracy and reward margin per hardness "
    "bucket. Available once the evaluation succeeded.",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The chart.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        401: UNAUTHORIZED,
        404: NOT_FOUND,
        409: NOT_READY,
    },
)
def download_chart(
    evaluation_id: str, request: Request, session: SessionDep, tenant: CurrentTenant, services: ServicesDep
) -> Response:
    job = _tenant_evaluation(session, tenant_id=tenant.id, evaluation_id=evaluation_id)
    path, sha256 = _succeeded_artifact(session, services, job, "eval_chart", "chart")
    return artifact_response(
        services.artifacts,
        path,
        request=request,
        mode=services.settings.download_mode,
        media_type="image/png",
        headers={"X-Content-SHA256": sha256},
    )
