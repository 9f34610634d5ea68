"""What a job produces while and after it runs: events (paged or live over SSE), metric series, checkpoints and
the trained adapter.

The live event stream polls the job store (a new short session per poll) rather than holding a connection or
listening on the broker: Postgres is the one source of truth, and a stream resumes exactly from ``Last-Event-ID``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import CurrentTenant, Services, ServicesDep, SessionDep
from api.downloads import archive_responses, artifact_response, digest_headers, safe_label
from api.errors import ApiError
from api.routers.jobs import JOB_NOT_FOUND, UNAUTHORIZED, get_tenant_job
from api.schemas import (
    CheckpointsPublic,
    ErrorResponse,
    EventPublic,
    EventsPublic,
    MetricsPublic,
    checkpoint_public,
    event_public,
)
from jobstore import repository
from jobstore.artifacts import file_sha256, pack_folder
from jobstore.db import session_scope
from jobstore.states import TERMINAL, JobStatus

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["job outputs"])

POLL_INTERVAL_S = 0.5
DB_RETRY_S = 2.0
STREAM_BATCH = 500
SSE_PING_S = 15
MAX_SEQ = 2**31 - 1  # event seqs are 32-bit integers in the job store; a larger cursor is refused, not a 500

# ``?after=`` and ``?limit=`` of the two events routes (jobs and evaluations).
EventsAfter = Annotated[
    int, Query(ge=0, le=MAX_SEQ, description="Events after this seq (0: from the start).", examples=[0])
]
EventsLimit = Annotated[int, Query(ge=1, le=1000, description="Events per page (1-1000).", examples=[100])]

_SSE_DOC = (
    "With `Accept: text/event-stream`, follows the job live instead: each event is sent as `id: <seq>`, "
    "`event: <type>`, `data: <EventPublic JSON>`, starting after `Last-Event-ID` (or `?after=`); the stream ends "
    "once the job has reached a final status and every event was sent."
)


def _poll(services: Services, *, job_id: str, after: int) -> tuple[str | None, list[EventPublic], bool]:
    """The job's status and the next events after ``after``, read in that order: an event recorded with a final
    status commits with it, so once the status read is final, the events read next include the last one."""
    with session_scope(services.session_factory) as session:
        job = repository.get_job(session, job_id=job_id)
        if job is None:
            return None, [], False
        job_status = job.status
        events, has_more = repository.list_events(session, job_id=job_id, after_seq=after, limit=STREAM_BATCH)
        return job_status, [event_public(event) for event in events], has_more


async def _follow(services: Services, *, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    last = after
    while True:
        try:
            job_status, events, has_more = await run_in_threadpool(_poll, services, job_id=job_id, after=last)
        except OperationalError as error:  # the database blinked: keep the stream, try again shortly
            logger.warning("event stream of %s: job store unavailable (%s); retrying", job_id, error)
            await anyio.sleep(DB_RETRY_S)
            continue
        for event in events:
            yield ServerSentEvent(data=event.model_dump_json(), event=event.type, id=str(event.seq))
            last = event.seq
        if job_status is None or (JobStatus(job_status) in TERMINAL and not has_more):
            return
        if not has_more:
            await anyio.sleep(POLL_INTERVAL_S)


def _start_seq(after: int, last_event_id: str | None) -> int:
    if last_event_id is None or not last_event_id.strip():
        return after
    try:
        value = int(last_event_id.strip())
    except ValueError:
        raise ApiError(
            422, "invalid_last_event_id", "Last-Event-ID: must be an event seq (an integer)", param="Last-Event-ID"
        ) from None
    if not 0 <= value <= MAX_SEQ:
        raise ApiError(
            422, "invalid_last_event_id", f"Last-Event-ID: must be between 0 and {MAX_SEQ}", param="Last-Event-ID"
        )
    return value


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
    return events_response(job_id, request, session, services, after=after, limit=limit, last_event_id=last_event_id)


def events_response(
    job_id: str,
    request: Request,
    session: Session,
    services: Services,
    *,
    after: int,
    limit: int,
    last_event_id: str | None,
) -> Any:
    """A page of the job's events, or (``Accept: text/event-stream``) the live stream; the caller checked that
    the job is the tenant's. Shared by ``/jobs/{id}/events`` and ``/evaluations/{id}/events``."""
    if "text/event-stream" in request.headers.get("accept", ""):
        start = _start_seq(after, last_event_id)
        session.close()  # the stream polls with short sessions of its own
        return EventSourceResponse(_follow(services, job_id=job_id, after=start), ping=SSE_PING_S)
    events, has_more = repository.list_events(session, job_id=job_id, after_seq=after, limit=limit)
    return EventsPublic(
        data=[event_public(event) for event in events],
        has_more=has_more,
        next_cursor=str(events[-1].seq if events else after),
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
    get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    wanted = [key.strip() for key in (keys or "").split(",") if key.strip()]
    series = repository.metric_series(session, job_id=job_id, keys=wanted or None)
    return MetricsPublic(
        job_id=job_id,
        series={key: [(int(step), float(value)) for step, value in points] for key, points in series.items()},
    )


@router.get(
    "/{job_id}/checkpoints",
    summary="List a job's checkpoints",
    responses={401: UNAUTHORIZED, 404: JOB_NOT_FOUND},
)
def list_checkpoints(job_id: str, session: SessionDep, tenant: CurrentTenant) -> CheckpointsPublic:
    get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    checkpoints = repository.list_checkpoints(session, job_id=job_id)
    return CheckpointsPublic(data=[checkpoint_public(item) for item in checkpoints], has_more=False, next_cursor=None)


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
    job = get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    if job.status != JobStatus.succeeded.value:
        raise ApiError(
            409,
            "adapter_not_ready",
            f"the job is {job.status}; its adapter can be downloaded once it has succeeded",
        )
    store = services.artifacts
    path = store.adapter_archive(job_id)
    artifact = repository.get_artifact(session, job_id=job_id, kind="adapter")
    if not store.exists(path) or (artifact is None and not store.fetch(path)):
        raise ApiError(404, "adapter_not_found", "the job succeeded but its adapter archive is missing from the store")
    sha256 = artifact.sha256 if artifact is not None else file_sha256(path)
    label = safe_label(job.spec.get("suffix") if isinstance(job.spec, dict) else None)
    filename = f"{job_id}-{label}-adapter.tar.gz" if label else f"{job_id}-adapter.tar.gz"
    return artifact_response(
        store,
        path,
        request=request,
        media_type="application/gzip",
        mode=services.settings.download_mode,
        filename=filename,
        headers=digest_headers(sha256),
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
    get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    store = services.artifacts
    checkpoint = repository.get_checkpoint(session, job_id=job_id, step=step)
    folder = store.checkpoint_adapter_dir(job_id, checkpoint.path) if checkpoint else None
    if checkpoint is None or folder is None:
        kept = [item.step for item in repository.list_checkpoints(session, job_id=job_id)]
        raise ApiError(
            404,
            "checkpoint_not_found",
            f"step: no kept checkpoint with an adapter at step {step} (kept steps: {kept or 'none'})",
            param="step",
        )
    archive = store.checkpoint_adapter_archive(job_id, step)
    recorded = store.recorded_path(archive)
    artifact = repository.get_artifact_by_path(session, job_id=job_id, path=recorded)
    if artifact is None or not store.exists(archive):
        # Packed here from the checkpoint's files (with S3: downloaded into this API's working copy first), then
        # published, so every API instance serves the same stored archive.
        if store.checkpoint_adapter_dir(job_id, checkpoint.path, fetch=True) is None:
            raise ApiError(404, "checkpoint_not_found", f"step: the checkpoint at step {step} was pruned", param="step")
        pack_folder(folder, archive)
        store.publish(archive)
        artifact = repository.add_artifact(
            session,
            tenant_id=tenant.id,
            job_id=job_id,
            kind="checkpoint_adapter",
            path=recorded,
            size_bytes=archive.stat().st_size,
            sha256=file_sha256(archive),
        )
        session.commit()
        if store.remote:  # served from the store from now on: this API keeps no copies
            shutil.rmtree(folder, ignore_errors=True)
            archive.unlink(missing_ok=True)
    filename = f"{job_id}-step{step}-adapter.tar.gz"
    return artifact_response(
        store,
        archive,
        request=request,
        media_type="application/gzip",
        mode=services.settings.download_mode,
        filename=filename,
        headers=digest_headers(artifact.sha256),
    )
