"""``/loops``: rounds of sample -> train -> evaluate on the server. Round k samples pairs from round k-1's tuned
model, trains that adapter further on them and evaluates it on a held-out set (:mod:`api.services.loops`).

A loop's runs are ordinary runs of the tenant (``/pair-generations``, ``/jobs``, ``/evaluations``); the loop
names them per round, with each round's held-out metrics.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from api.deps import After, CurrentTenant, EventsAfter, EventsLimit, IdempotencyKey, Limit, ServicesDep, SessionDep
from api.responses import KEY_REUSED, STORAGE_FULL, UNAUTHORIZED
from api.responses import LOOP_NOT_FOUND as NOT_FOUND
from api.schemas import ErrorResponse, EventsPublic, LoopPublic, LoopsPublic
from api.services import events, jobs, loops
from jobstore.models import Job
from jobstore.spec import LoopCreate
from jobstore.states import JobStatus

router = APIRouter(prefix="/loops", tags=["loops"])


def _public(session: SessionDep, loop: Job) -> LoopPublic:
    views = loops.rounds(session, loop=loop)
    return LoopPublic.of(loop, views, progress=loops.progress(loop, views))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a loop",
    description="Runs `rounds` rounds, one stage at a time: a pair generation on generative_dataset_id from the "
    "previous round's tuned model (round 1: the model, or base + init_adapter), a training job that trains that "
    "adapter further on the new pairs (its reference is base + the previous adapter), and an evaluation of the "
    "result on held_out_dataset_id (CHAIR_i, CHAIR_s, coverage, POPE F1). Each stage is an ordinary run, started "
    "when the previous one succeeds; a failed or cancelled stage ends the loop. Every round samples with the same "
    "seed. Returns 200 instead of 201 when an Idempotency-Key replays an earlier request.",
    responses={
        200: {"model": LoopPublic, "description": "Replayed: the loop an earlier request created."},
        400: {
            "model": ErrorResponse,
            "description": "unknown_model, prompts_over_limit (the set has more prompts than DAMA_PAIRS_MAX_PROMPTS "
            "and sampling.max_prompts is not set), or filter_group_too_small.",
        },
        401: UNAUTHORIZED,
        403: STORAGE_FULL,
        404: {"model": ErrorResponse, "description": "A dataset or init_adapter's job is not this tenant's."},
        409: KEY_REUSED,
        422: {
            "model": ErrorResponse,
            "description": "Invalid request: a field out of range, rounds over DAMA_LOOPS_MAX_ROUNDS, a dataset that "
            "is not generative, the held-out set being the sampled set, more than one round without LoRA, sampling "
            "over the pair generations' limits, an init_adapter of another base; param names the field.",
        },
        429: {
            "model": ErrorResponse,
            "description": "too_many_active_loops: DAMA_LOOPS_MAX_ACTIVE loops of this tenant are running.",
        },
    },
)
def create_loop(
    spec: LoopCreate,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> LoopPublic:
    loop, replayed = loops.create_loop(
        session, services, tenant_id=tenant.id, spec=spec, idempotency_key=idempotency_key
    )
    if replayed:
        response.status_code = status.HTTP_200_OK
    return _public(session, loop)


@router.get("", summary="List loops", responses={401: UNAUTHORIZED})
def list_loops(
    session: SessionDep,
    tenant: CurrentTenant,
    status_filter: Annotated[
        JobStatus | None, Query(alias="status", description="Only loops in this status.", examples=["running"])
    ] = None,
    limit: Limit = 20,
    after: After = None,
) -> LoopsPublic:
    rows, has_more = jobs.list_jobs(
        session, tenant_id=tenant.id, kind=loops.KIND, status=status_filter, limit=limit, after=after
    )
    return LoopsPublic.of([_public(session, loop) for loop in rows], has_more=has_more)


@router.get("/{loop_id}", summary="Get a loop", responses={401: UNAUTHORIZED, 404: NOT_FOUND})
def get_loop(loop_id: str, session: SessionDep, tenant: CurrentTenant) -> LoopPublic:
    return _public(session, loops.get_tenant_loop(session, tenant_id=tenant.id, loop_id=loop_id))


@router.post(
    "/{loop_id}/cancel",
    summary="Cancel a loop",
    description="Cancels the loop's current run (a queued one at once, a running one before its next step or batch) "
    "and ends the loop as cancelled once that run has stopped; no later stage starts. Cancelling a loop that is "
    "already cancelling is a no-op.",
    responses={
        401: UNAUTHORIZED,
        404: NOT_FOUND,
        409: {"model": ErrorResponse, "description": "The loop already ended."},
    },
)
def cancel_loop(loop_id: str, session: SessionDep, tenant: CurrentTenant, services: ServicesDep) -> LoopPublic:
    loop = loops.cancel(session, services, tenant_id=tenant.id, loop_id=loop_id)
    return _public(session, loop)


@router.get(
    "/{loop_id}/events",
    summary="List or follow a loop's events",
    description="The loop's own events: its status changes, each stage's run queued (data: round, stage, run_id) "
    "and each round's metrics (type 'round'). A page at a time (`?after=<seq>&limit=`), or with `Accept: "
    "text/event-stream` followed live until the loop ends. Each run has its own events under its route.",
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
def list_loop_events(
    loop_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    after: EventsAfter = 0,
    limit: EventsLimit = 100,
) -> Any:
    loops.get_tenant_loop(session, tenant_id=tenant.id, loop_id=loop_id)
    last_event_id = request.headers.get("last-event-id")
    return events.page_or_stream(
        loop_id, request, session, services, after=after, limit=limit, last_event_id=last_event_id
    )
