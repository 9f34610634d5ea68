"""What a job produces while and after it runs: events (paged or live over SSE), metric series, checkpoints and
the trained adapter (the work is in :mod:`api.services.events` and :mod:`api.services.outputs`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse

from api.deps import MAX_SEQ, CurrentTenant, EventsAfter, EventsLimit, ServicesDep, SessionDep
from api.downloads import archive_responses, artifact_response, digest_headers
from api.responses import JOB_NOT_FOUND, UNAUTHORIZED
from api.schemas import CheckpointsPublic, ErrorResponse, EventsPublic, MetricsPublic
from api.services import events, outputs
from api.services.jobs import get_tenant_job

router = APIRouter(prefix="/jobs", tags=["job outputs"])

_SSE_DOC = (
    "With `Accept: text/event-stream`, follows the job live instead: each event is sent as `id: <seq>`, "
    "`event: <type>`, `data: <EventPublic JSON>`, starting after `Last-Event-ID` (or `?after=`); the stream ends "
    "once the job has reached a final status and every event was sent."
)


@router.get(
    "/{job_id}/events",
    summary="List or follow a job's events",
    description="Events in order, a page at a time (`?after=<seq>&limit=`). " + _SSE_DOC,
    response_model=EventsPublic,
    responses={
        200: {
            "description": "A page of events, or (Accept: text/event-stream) the live stream.",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'id: 7\nevent: stage\ndata: {"seq": 7, "type": "stage", ...}\n\n',
                }
            },
        },
        401: UNAUTHORIZED,
        404: JOB_NOT_FOUND,
    },
)
def list_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    after: EventsAfter = 0,
    limit: EventsLimit = 100,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=20,
            description="SSE resume point: stream events after this seq.",
            examples=["7"],
        ),
    ] = None,
) -> Any:
    get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    return events.page_or_stream(
        job_id, request, session, services, after=after, limit=limit, last_event_id=last_event_id
    )


@router.get(
    "/{job_id}/metrics",
    summary="Get a job's metric series",
    responses={401: UNAUTHORIZED, 404: JOB_NOT_FOUND},
)
def get_metrics(
    job_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    keys: Annotated[
        str | None,
        Query(description="Comma-separated metric keys; default: every key.", examples=["loss,reward_margin"]),
    ] = None,
) -> MetricsPublic:
    wanted = [key.strip() for key in (keys or "").split(",") if key.strip()]
    series = outputs.metric_series(session, tenant_id=tenant.id, job_id=job_id, keys=wanted)
    return MetricsPublic(job_id=job_id, series=series)


@router.get(
    "/{job_id}/checkpoints",
    summary="List a job's checkpoints",
    responses={401: UNAUTHORIZED, 404: JOB_NOT_FOUND},
)
def list_checkpoints(job_id: str, session: SessionDep, tenant: CurrentTenant) -> CheckpointsPublic:
    return CheckpointsPublic.of(outputs.checkpoints(session, tenant_id=tenant.id, job_id=job_id))


@router.get(
    "/{job_id}/adapter",
    summary="Download the trained adapter",
    description="The PEFT adapter as a .tar.gz (adapter_config.json, adapter_model.safetensors, processor files, "
    "training config, metrics, model card), once the job succeeded. `X-Content-SHA256` (hex) and `Repr-Digest` "
    "carry its SHA-256; Range requests are supported. With an S3 store and `DAMA_DOWNLOAD_MODE=redirect`: 307 "
    "to a presigned link.",
    response_class=FileResponse,
    responses={
        **archive_responses("The adapter archive.", "application/gzip"),
        401: UNAUTHORIZED,
        404: {"model": ErrorResponse, "description": "No such job for this tenant, or its adapter is missing."},
        409: {"model": ErrorResponse, "description": "The job has not succeeded (yet)."},
    },
)
def download_adapter(
    job_id: str, request: Request, session: SessionDep, tenant: CurrentTenant, services: ServicesDep
) -> Response:
    archive = outputs.adapter(session, services, tenant_id=tenant.id, job_id=job_id)
    return artifact_response(
        services.artifacts,
        archive.path,
        request=request,
        media_type="application/gzip",
        mode=services.settings.download_mode,
        filename=archive.filename,
        headers=digest_headers(archive.sha256),
    )


@router.get(
    "/{job_id}/checkpoints/{step}/adapter",
    summary="Download a checkpoint's adapter",
    description="Any kept checkpoint's LoRA adapter as a .tar.gz that `PeftModel.from_pretrained(base, folder)` "
    "loads (adapter_config.json, adapter_model.safetensors), while the job runs or after it ended. Packed from the "
    "files the engine wrote on the first request, then served as stored; `X-Content-SHA256` and `Repr-Digest` carry "
    "its SHA-256; Range requests are supported (with an S3 store and `DAMA_DOWNLOAD_MODE=redirect`: 307 to a "
    "presigned link). How many checkpoints are kept: `hyperparameters.keep_checkpoints`.",
    response_class=FileResponse,
    responses={
        **archive_responses("The checkpoint's adapter archive.", "application/gzip"),
        401: UNAUTHORIZED,
        404: {
            "model": ErrorResponse,
            "description": "No such job for this tenant, no kept checkpoint at this step, or the job is a full "
            "fine-tune (its checkpoints hold no adapter).",
        },
    },
)
def download_checkpoint_adapter(
    job_id: str,
    step: Annotated[int, Path(ge=0, le=MAX_SEQ, description="The checkpoint's optimizer step.", examples=[50])],
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
) -> Response:
    archive = outputs.checkpoint_adapter(session, services, tenant_id=tenant.id, job_id=job_id, step=step)
    return artifact_response(
        services.artifacts,
        archive.path,
        request=request,
        media_type="application/gzip",
        mode=services.settings.download_mode,
        filename=archive.filename,
        headers=digest_headers(archive.sha256),
    )
