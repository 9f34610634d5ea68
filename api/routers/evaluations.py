"""``/evaluations``: score a base model (and a training job's adapter against it) on uploaded datasets.

An evaluation is a job of kind ``evaluation`` (:mod:`api.services.evaluations`). Outputs: the results as
``metrics``, the per-sample generations (``/outputs``, JSONL) and the chart (``/chart``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse

from api.deps import After, CurrentTenant, EventsAfter, EventsLimit, IdempotencyKey, Limit, ServicesDep, SessionDep
from api.downloads import artifact_response
from api.responses import EVALUATION_NOT_FOUND as NOT_FOUND
from api.responses import EVALUATION_NOT_READY as NOT_READY
from api.responses import STORAGE_FULL, TOO_MANY_ACTIVE, UNAUTHORIZED
from api.schemas import ErrorResponse, EvaluationPublic, EvaluationsPublic, EventsPublic
from api.services import evaluations, events, jobs
from jobstore.spec import EvaluationCreate
from jobstore.states import JobStatus

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


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
        400: {"model": ErrorResponse, "description": "unknown_model: a dama/... name that is not built in."},
        401: UNAUTHORIZED,
        403: STORAGE_FULL,
        429: TOO_MANY_ACTIVE,
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
    job, replayed = evaluations.create_evaluation(
        session, services, tenant_id=tenant.id, spec=spec, idempotency_key=idempotency_key
    )
    if replayed:
        response.status_code = status.HTTP_200_OK
    return EvaluationPublic.model_validate(job)


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
    rows, has_more = jobs.list_jobs(
        session, tenant_id=tenant.id, kind=evaluations.KIND, status=status_filter, limit=limit, after=after
    )
    return EvaluationsPublic.of(rows, has_more=has_more)


@router.get("/{evaluation_id}", summary="Get an evaluation", responses={401: UNAUTHORIZED, 404: NOT_FOUND})
def get_evaluation(evaluation_id: str, session: SessionDep, tenant: CurrentTenant) -> EvaluationPublic:
    job = evaluations.get_tenant_evaluation(session, tenant_id=tenant.id, evaluation_id=evaluation_id)
    return EvaluationPublic.model_validate(job)


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
    job = jobs.cancel(session, tenant_id=tenant.id, job_id=evaluation_id, kind=evaluations.KIND)
    return EvaluationPublic.model_validate(job)


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
    evaluations.get_tenant_evaluation(session, tenant_id=tenant.id, evaluation_id=evaluation_id)
    last_event_id = request.headers.get("last-event-id")
    return events.page_or_stream(
        evaluation_id, request, session, services, after=after, limit=limit, last_event_id=last_event_id
    )


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
    path, sha256 = evaluations.succeeded_output(
        session,
        services,
        tenant_id=tenant.id,
        evaluation_id=evaluation_id,
        kind=evaluations.OUTPUT_KINDS[file],
        what=f"{file} output",
    )
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
    path, sha256 = evaluations.succeeded_output(
        session, services, tenant_id=tenant.id, evaluation_id=evaluation_id, kind="eval_chart", what="chart"
    )
    return artifact_response(
        services.artifacts,
        path,
        request=request,
        mode=services.settings.download_mode,
        media_type="image/png",
        headers={"X-Content-SHA256": sha256},
    )
