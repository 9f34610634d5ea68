"""The webhook dispatcher: delivers the job store's webhook outbox (:mod:`jobstore.webhook_store`).

Where it runs: a daemon thread in every worker process (:class:`DispatcherThread`), beside the sweeper, so no
extra process is needed and delivery goes on while the worker trains. Several workers dispatching at once is
safe: each claims due deliveries atomically for a lease (``FOR UPDATE SKIP LOCKED`` on Postgres, a conditional
update on SQLite). Retries are rows with a due time in the job store, not broker countdowns: they survive worker
restarts and do not collide with the broker's visibility timeout. The API process runs no dispatcher.

Each attempt resolves the endpoint's host, refuses it unless every address is public (or the host is on
``DAMA_WEBHOOK_ALLOWED_HOSTS``), connects to the address it checked (the URL's host goes in ``Host`` and, for
https, in SNI and certificate checks), and follows no redirect: a 3xx answer is a failed attempt.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from jobstore import webhook_store
from jobstore.db import session_scope
from jobstore.settings import Settings
from jobstore.webhooks import RefusedTarget, pinned_address, sign
from worker.periodic import PeriodicThread

log = logging.getLogger(__name__)

USER_AGENT = "dama-webhooks/1"
BATCH = 20


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    latency_ms: float | None
    error: str | None  # None: delivered (a 2xx answer)


def send(delivery: webhook_store.DueDelivery, *, settings: Settings) -> Outcome:
    """One signed POST of ``delivery`` to its endpoint."""
    parts = urlsplit(delivery.url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        address = pinned_address(host, port, allowed_hosts=settings.allowed_webhook_hosts)
    except RefusedTarget as refused:
        return Outcome(None, None, str(refused))
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    pinned_url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": delivery.message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(
            secret=delivery.secret, message_id=delivery.message_id, timestamp=timestamp, body=body
        ),
    }
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    started = time.monotonic()
    try:
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("POST", pinned_url, content=body, headers=headers, extensions=extensions)
            response = client.send(request, stream=True)  # the receiver's body is not read: only its status
            response.close()
    except httpx.HTTPError as error:
        latency = (time.monotonic() - started) * 1000
        return Outcome(None, latency, f"{type(error).__name__}: {error}"[:500])
    latency = (time.monotonic() - started) * 1000
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(code, latency, None)
    if 300 <= code < 400:
        return Outcome(code, latency, f"HTTP {code}: redirects are not followed")
    return Outcome(code, latency, f"HTTP {code}")


def dispatch_due(session_factory: sessionmaker[Session], settings: Settings) -> int:
    """Claim the due deliveries, send them and record the outcomes; returns how many were attempted."""
    lease_s = settings.webhook_timeout_s * 3 + 30  # longer than a resolve plus a request, so no second claim
    with session_scope(session_factory) as session:
        due = webhook_store.claim_due(session, lease_s=lease_s, limit=BATCH)
    for delivery in due:
        outcome = send(delivery, settings=settings)
        with session_scope(session_factory) as session:
            status = webhook_store.record_attempt(
                session,
                delivery_id=delivery.id,
                status_code=outcome.status_code,
                latency_ms=outcome.latency_ms,
                error=outcome.error,
                retry_schedule_s=settings.retry_schedule,
                disable_after=settings.webhook_disable_after,
            )
        log.info("webhook %s (%s): %s", delivery.id, delivery.message_id, outcome.error or status)
    return len(due)


class DispatcherThread(PeriodicThread):
    """Runs :func:`dispatch_due` every ``settings.webhook_poll_s`` (at once again after a full batch)."""

    label = "webhooks"

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.interval_s = settings.webhook_poll_s
        self.stop_timeout_s = settings.webhook_timeout_s + 5  # an attempt in flight may finish
        super().__init__()

    def run_pass(self) -> bool:
        return dispatch_due(self.session_factory, self.settings) >= BATCH
