"""A job's events: a page of them, or the live ``text/event-stream`` (jobs and evaluations alike).

The live event stream polls the job store (a new short session per poll) rather than holding a connection or
listening on the broker: Postgres is the one source of truth, and a stream resumes exactly from ``Last-Event-ID``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import MAX_SEQ, Services
from api.errors import ApiError
from api.schemas import EventPublic, EventsPublic
from jobstore import repository
from jobstore.db import session_scope
from jobstore.states import TERMINAL, JobStatus

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
DB_RETRY_S = 2.0
STREAM_BATCH = 500
SSE_PING_S = 15


def _poll(services: Services, *, job_id: str, after: int) -> tuple[str | None, list[EventPublic], bool]:
    """The job's status and the next events after ``after``, read in that order: an event recorded with a final
    status commits with it, so once the status read is final, the events read next include the last one."""
    with session_scope(services.session_factory) as session:
        job = repository.get_job(session, job_id=job_id)
        if job is None:
            return None, [], False
        job_status = job.status
        events, has_more = repository.list_events(session, job_id=job_id, after_seq=after, limit=STREAM_BATCH)
        return job_status, [EventPublic.model_validate(event) for event in events], has_more


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


def page_or_stream(
    job_id: str,
    request: Request,
    session: Session,
    services: Services,
    *,
    after: int,
    limit: int,
    last_event_id: str | None,
) -> EventsPublic | EventSourceResponse:
    """A page of the job's events, or (``Accept: text/event-stream``) the live stream; the caller checked that
    the job is the tenant's."""
    if "text/event-stream" in request.headers.get("accept", ""):
        start = _start_seq(after, last_event_id)
        session.close()  # the stream polls with short sessions of its own
        return EventSourceResponse(_follow(services, job_id=job_id, after=start), ping=SSE_PING_S)
    events, has_more = repository.list_events(session, job_id=job_id, after_seq=after, limit=limit)
    # The cursor is the last seq seen, on every page: a client polls with it for events still to come.
    return EventsPublic.of(events, has_more=has_more, cursor=str(events[-1].seq if events else after))
