"""Keyword-only job-store functions for webhooks: endpoints, the delivery outbox and its attempts.

The outbox is written by :func:`announce`, which :func:`jobstore.repository.set_status` and
:func:`jobstore.repository.claim_job` call inside the transaction that changes the job's status: an event is
recorded exactly when the change commits (none lost, none invented). Workers deliver it later
(:mod:`worker.webhooks`), claiming due rows with :func:`claim_due` and recording each try with
:func:`record_attempt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobstore.db import page
from jobstore.models import Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint, new_id, utcnow
from jobstore.webhooks import ALL_EVENTS, ANNOUNCED_STATUSES, EVENT_PREFIXES, new_secret, subscribes

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"

# ---- endpoints -------------------------------------------------------------------------------------------------


def create_endpoint(
    session: Session,
    *,
    tenant_id: str,
    url: str,
    event_types: Sequence[str] | None = None,
    description: str | None = None,
) -> WebhookEndpoint:
    """A new endpoint receiving ``event_types`` (duplicates dropped), or with None every event type, those added
    later included (stored as :data:`jobstore.webhooks.ALL_EVENTS`)."""
    endpoint = WebhookEndpoint(
        id=new_id("wh"),
        tenant_id=tenant_id,
        url=url,
        event_types=[ALL_EVENTS] if event_types is None else list(dict.fromkeys(event_types)),
        description=description,
        secret=new_secret(),
        consecutive_failures=0,
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def get_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant_id)
    )


def list_endpoints(
    session: Session, *, tenant_id: str, limit: int, after: str | None
) -> tuple[list[WebhookEndpoint], bool]:
    query = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    return page(session, query, WebhookEndpoint, limit=limit, after=after)


def set_enabled(session: Session, *, endpoint: WebhookEndpoint, enabled: bool, reason: str | None = None) -> None:
    """Enable (the failure count starts again) or disable ``endpoint``; pending deliveries wait while disabled."""
    if enabled:
        endpoint.disabled_at, endpoint.disabled_reason, endpoint.consecutive_failures = None, None, 0
    elif endpoint.disabled_at is None:
        endpoint.disabled_at, endpoint.disabled_reason = utcnow(), reason


# ---- the outbox ------------------------------------------------------------------------------------------------


def event_payload(job: Job, event_type: str, now: datetime) -> dict[str, Any]:
    """The body receivers get: ``{type, timestamp, data}`` as Standard Webhooks recommends."""
    error = {"kind": job.error_kind, "message": job.error_message} if job.error_kind is not None else None
    return {
        "type": event_type,
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": {
            "id": job.id,
            "object": job.kind if job.kind in ("evaluation", "pair_generation", "loop") else "job",
            "status": job.status,
            "attempt": job.attempts,
            "error": error,
        },
    }


def announce(session: Session, *, job: Job) -> list[WebhookDelivery]:
    """Queue ``job``'s current status for every enabled endpoint of its tenant subscribed to it (same
    transaction as the status change). Returns the new outbox rows."""
    prefix = EVENT_PREFIXES.get(job.kind)
    if prefix is None or job.status not in ANNOUNCED_STATUSES:
        return []
    event_type = f"{prefix}.{job.status}"
    now = utcnow()
    return announce_event(
        session, tenant_id=job.tenant_id, event_type=event_type, payload=event_payload(job, event_type, now), now=now
    )


def announce_event(
    session: Session, *, tenant_id: str, event_type: str, payload: dict[str, Any], now: datetime | None = None
) -> list[WebhookDelivery]:
    """Queue one event of any run kind for every enabled endpoint of the tenant that receives ``event_type``: those
    that named it, and those created with the default (every event type, also types added after they were
    made). Returns the new outbox rows."""
    endpoints = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.disabled_at.is_(None))
    )
    subscribed = [endpoint for endpoint in endpoints if subscribes(endpoint.event_types, event_type)]
    if not subscribed:
        return []
    now = now or utcnow()
    message_id = new_id("msg")  # one message, one webhook-id, whichever endpoints it goes to
    rows = [
        WebhookDelivery(
            id=new_id("whd"),
            endpoint_id=endpoint.id,
            message_id=message_id,
            event_type=event_type,
            payload=payload,
            status=PENDING,
            retry_index=0,
            attempt_count=0,
            next_attempt_at=now,
            created_at=now,
        )
        for endpoint in subscribed
    ]
    session.add_all(rows)
    session.flush()
    return rows


def delete_endpoint(session: Session, *, endpoint: WebhookEndpoint) -> None:
    """Remove the endpoint with its delivery log (ON DELETE CASCADE)."""
    session.delete(endpoint)
    session.flush()


def list_deliveries(
    session: Session, *, endpoint_id: str, limit: int, after: str | None
) -> tuple[list[WebhookDelivery], bool]:
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    return page(session, query, WebhookDelivery, limit=limit, after=after)


def attempts_of(session: Session, *, delivery_ids: Sequence[str]) -> dict[str, list[WebhookAttempt]]:
    """Each delivery's attempts, oldest first."""
    found: dict[str, list[WebhookAttempt]] = {delivery_id: [] for delivery_id in delivery_ids}
    if delivery_ids:
        rows = session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(delivery_ids))).order_by(WebhookAttempt.id)
        )
        for row in rows:
            found[row.delivery_id].append(row)
    return found


def get_delivery(session: Session, *, endpoint_id: str, delivery_id: str) -> WebhookDelivery | None:
    return session.scalar(
        select(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint_id)
    )


def redeliver(session: Session, *, delivery: WebhookDelivery) -> None:
    """Send the same message (same webhook-id) again now, with a fresh round of retries."""
    delivery.status, delivery.retry_index, delivery.next_attempt_at = PENDING, 0, utcnow()


def with_current_attempts(session: Session, *, delivery: WebhookDelivery) -> WebhookDelivery:
    """``delivery`` with its attempt count as stored now (a worker may have attempted it since it was read)."""
    session.refresh(delivery, ["attempts"])
    return delivery


# ---- delivery (workers) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DueDelivery:
    id: str
    message_id: str
    url: str
    secret: str
    payload: dict[str, Any]


def claim_due(session: Session, *, lease_s: float, limit: int) -> list[DueDelivery]:
    """Take up to ``limit`` due deliveries of enabled endpoints for this process for ``lease_s`` seconds.

    Postgres skips rows another worker has locked (``FOR UPDATE SKIP LOCKED``); on SQLite, which has no row
    locks, the conditional update below is what makes the claim exclusive. A worker that dies holding a claim
    only delays the delivery until its lease runs out: then another worker takes it (at least once)."""
    now = utcnow()
    due_ids = list(
        session.scalars(
            select(WebhookDelivery.id)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at <= now,
                WebhookEndpoint.disabled_at.is_(None),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        )
    )
    claimed: list[DueDelivery] = []
    lease_until = now + timedelta(seconds=lease_s)
    for delivery_id in due_ids:
        taken = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(next_attempt_at=lease_until)
            .execution_options(synchronize_session=False)
        )
        if getattr(taken, "rowcount", 0) != 1:
            continue
        row = session.execute(
            select(WebhookDelivery, WebhookEndpoint.url, WebhookEndpoint.secret)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.id == delivery_id)
        ).one()
        delivery, url, secret = row
        claimed.append(DueDelivery(delivery.id, delivery.message_id, url, secret, dict(delivery.payload)))
    return claimed


def record_attempt(
    session: Session,
    *,
    delivery_id: str,
    status_code: int | None,
    latency_ms: float | None,
    error: str | None,
    retry_schedule_s: Sequence[float],
    disable_after: int,
) -> str | None:
    """Log one attempt and decide what follows: done, the next retry, or failed (then the endpoint may be
    disabled). Returns the delivery's new status (None if it was deleted meanwhile)."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True, populate_existing=True)
    if delivery is None:
        return None
    now = utcnow()
    session.add(
        WebhookAttempt(
            delivery_id=delivery_id, attempted_at=now, status_code=status_code, latency_ms=latency_ms, error=error
        )
    )
    delivery.attempt_count += 1
    endpoint_id = delivery.endpoint_id
    if error is None:
        delivery.status, delivery.next_attempt_at = SUCCEEDED, None
        session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id).values(consecutive_failures=0))
    elif delivery.retry_index < len(retry_schedule_s):
        delivery.next_attempt_at = now + timedelta(seconds=retry_schedule_s[delivery.retry_index])
        delivery.retry_index += 1
    else:
        delivery.status, delivery.next_attempt_at = FAILED, None
        _count_failed_message(session, endpoint_id=endpoint_id, disable_after=disable_after)
    return delivery.status


def _count_failed_message(session: Session, *, endpoint_id: str, disable_after: int) -> None:
    failures = session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id)
        .values(consecutive_failures=WebhookEndpoint.consecutive_failures + 1)
        .returning(WebhookEndpoint.consecutive_failures)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if failures is not None and failures >= disable_after:
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.disabled_at.is_(None))
            .values(
                disabled_at=utcnow(),
                disabled_reason=f"{failures} messages in a row failed every delivery attempt; "
                're-enable it with PATCH /webhooks/{id} {"enabled": true}',
            )
            .execution_options(synchronize_session=False)
        )
