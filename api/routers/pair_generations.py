"""``/pair-generations``: preference pairs sampled from the tenant's own model on a generative set, judged against
each image's objects, registered as a dataset of the tenant.

A pair generation is a job of kind ``pair_generation`` (:mod:`api.services.pair_generations`). Outputs: the dataset
(``dataset_id``), the per-sample file, the report and its chart (``/outputs?file=samples|report|chart``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse

from api.deps import After, CurrentTenant, EventsAfter, EventsLimit, IdempotencyKey, Limit, ServicesDep, SessionDep
from api.downloads import artifact_response
from api.responses import KEY_REUSED, STORAGE_FULL, TOO_MANY_ACTIVE, UNAUTHORIZED
from api.responses import PAIR_GENERATION_NOT_FOUND as NOT_FOUND
from api.responses import PAIR_GENERATION_NOT_READY as NOT_READY
from api.schemas import ErrorResponse, EventsPublic, PairGenerationPublic, PairGenerationsPublic
from api.services import events, jobs, pair_generations
from jobstore.spec import PairGenerationCreate
from jobstore.states import JobStatus

router = APIRouter(prefix="/pair-generations", tags=["pair generations"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a pair generation",
    description="Samples samples_per_prompt answers per prompt of a generative dataset from the model (or base + "
    "init_adapter), judges each against the image's objects with the set's vocabulary (CHAIR matcher), and pairs "
    "a faithful answer (chosen: the one covering most objects) with a hallucinating one (rejected: the one closest "
    "in length). The pairs become a preference dataset of this tenant, named by dataset_id once it succeeded. "
    "Records the run as queued and sends it to a worker queue. Returns 200 instead of 201 when an "
    "Idempotency-Key replays an earlier request.",
    responses={
        200: {"model": PairGenerationPublic, "description": "Replayed: the run an earlier request created."},
        400: {
            "model": ErrorResponse,
            "description": "unknown_model (a dama/... name that is not built in), or prompts_over_limit (the set "
            "has more prompts than DAMA_PAIRS_MAX_PROMPTS and max_prompts is not set).",
        },
        401: UNAUTHORIZED,
        403: STORAGE_FULL,
        404: {"model": ErrorResponse, "description": "The dataset or init_adapter's job is not this tenant's."},
        409: KEY_REUSED,
        422: {
            "model": ErrorResponse,
            "description": "Invalid request: a field out of range, dataset_not_generative (generative_dataset_id "
            "holds preference pairs, no objects), samples_per_prompt or max_prompts over the service's limits, an "
            "init_adapter of another base model or not ready; param names the field.",
        },
        429: TOO_MANY_ACTIVE,
    },
)
def create_pair_generation(
    spec: PairGenerationCreate,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> PairGenerationPublic:
    job, replayed = pair_generations.create_pair_generation(
        session, services, tenant_id=tenant.id, spec=spec, idempotency_key=idempotency_key
    )
    if replayed:
        response.status_code = status.HTTP_200_OK
    return PairGenerationPublic.model_validate(job)


@router.get("", summary="List pair generations", responses={401: UNAUTHORIZED})
def list_pair_generations(
    session: SessionDep,
    tenant: CurrentTenant,
    status_filter: Annotated[
        JobStatus | None, Query(alias="status", description="Only runs in this status.", examples=["succeeded"])
    ] = None,
    limit: Limit = 20,
    after: After = None,
) -> PairGenerationsPublic:
    rows, has_more = jobs.list_jobs(
        session, tenant_id=tenant.id, kind=pair_generations.KIND, status=status_filter, limit=limit, after=after
    )
    return PairGenerationsPublic.of(rows, has_more=has_more)


@router.get("/{pair_generation_id}", summary="Get a pair generation", responses={401: UNAUTHORIZED, 404: NOT_FOUND})
def get_pair_generation(pair_generation_id: str, session: SessionDep, tenant: CurrentTenant) -> PairGenerationPublic:
    job = pair_generations.get_tenant_pair_generation(
        session, tenant_id=tenant.id, pair_generation_id=pair_generation_id
    )
    return PairGenerationPublic.model_validate(job)


@router.post(
    "/{pair_generation_id}/cancel",
    summary="Cancel a pair generation",
    description="A queued run is cancelled at once; a running one becomes 'cancelling' and stops before its next "
    "batch of prompts, leaving no dataset. Cancelling one that is already cancelling is a no-op.",
    responses={
        401: UNAUTHORIZED,
        404: NOT_FOUND,
        409: {"model": ErrorResponse, "description": "The run already ended."},
    },
)
def cancel_pair_generation(pair_generation_id: str, session: SessionDep, tenant: CurrentTenant) -> PairGenerationPublic:
    job = jobs.cancel(session, tenant_id=tenant.id, job_id=pair_generation_id, kind=pair_generations.KIND)
    return PairGenerationPublic.model_validate(job)


@router.get(
    "/{pair_generation_id}/events",
    summary="List or follow a pair generation's events",
    description="Events in order, a page at a time (`?after=<seq>&limit=`), as for jobs. With `Accept: "
    "text/event-stream`, follows the run live (`id: <seq>`, `event: <type>`, `data: <EventPublic JSON>`, "
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
def list_pair_generation_events(
    pair_generation_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    after: EventsAfter = 0,
    limit: EventsLimit = 100,
) -> Any:
    pair_generations.get_tenant_pair_generation(session, tenant_id=tenant.id, pair_generation_id=pair_generation_id)
    last_event_id = request.headers.get("last-event-id")
    return events.page_or_stream(
        pair_generation_id, request, session, services, after=after, limit=limit, last_event_id=last_event_id
    )


@router.get(
    "/{pair_generation_id}/outputs",
    summary="Download a pair generation's per-sample file, report or chart",
    description="Streamed once the run succeeded. `file=samples` (default, JSONL): one line per sample: prompt "
    "id, sample number, seed, the answer, its mentioned, hallucinated, covered and missed objects, its score, and "
    "its role in a pair (chosen, rejected or null). `file=report` (JSON): the report as in `report`. `file=chart` "
    "(PNG): the report's histogram and most common hallucinated objects. `X-Content-SHA256` carries the SHA-256.",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The file.",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        401: UNAUTHORIZED,
        404: {"model": ErrorResponse, "description": "No such pair generation, or it has no such file."},
        409: NOT_READY,
    },
)
def download_pair_generation_output(
    pair_generation_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    file: Annotated[
        Literal["samples", "report", "chart"],
        Query(description="samples (JSONL), report (JSON) or chart (PNG).", examples=["samples"]),
    ] = "samples",
) -> Response:
    path, sha256 = pair_generations.succeeded_output(
        session, services, tenant_id=tenant.id, pair_generation_id=pair_generation_id, file=file
    )
    _, media_type, suffix = pair_generations.OUTPUTS[file]
    return artifact_response(
        services.artifacts,
        path,
        request=request,
        mode=services.settings.download_mode,
        media_type=media_type,
        filename=f"{pair_generation_id}-{file}.{suffix}",
        headers={"X-Content-SHA256": sha256},
    )
