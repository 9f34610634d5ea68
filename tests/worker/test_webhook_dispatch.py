"""The webhook dispatcher pass (``worker.webhooks.dispatch_due``) in process, on the real Postgres (and on
SQLite, the embedded default), sending to a real HTTP receiver on the loopback address: signatures verified
with the ``standardwebhooks`` library, the delivery log, retries, disabling, the address policy, redirects,
exclusive claims, and the outbox's transaction."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from itertools import repeat
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import WebhookVerificationError

from jobstore import repository, webhook_store
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import Base, Job, WebhookDelivery, WebhookEndpoint
from jobstore.settings import Settings
from tests.worker.webhook_receiver import Receiver, keep_only_endpoints_of
from worker.webhooks import dispatch_due


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def factory(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def tenant_id(factory: sessionmaker[Session]) -> Iterator[str]:
    with session_scope(factory) as session:
        tenant = repository.get_or_create_tenant(session, name=f"hooks-{secrets.token_hex(4)}")
        keep_only_endpoints_of(session, tenant.id)
        tenant_id = tenant.id
    yield tenant_id
    with session_scope(factory) as session:  # nothing of this test left for a later dispatcher
        session.query(WebhookEndpoint).filter(WebhookEndpoint.tenant_id == tenant_id).delete()


def _settings(url: str, **values: object) -> Settings:
    defaults: dict[str, object] = {"webhook_allowed_hosts": "127.0.0.1", "webhook_retry_schedule_s": "0"}
    return Settings(database_url=url, **(defaults | values))  # type: ignore[arg-type]


def _endpoint(factory: sessionmaker[Session], tenant_id: str, url: str) -> WebhookEndpoint:
    with session_scope(factory) as session:
        return webhook_store.create_endpoint(session, tenant_id=tenant_id, url=url, event_types=["job.cancelled"])


def _cancelled_job(factory: sessionmaker[Session], tenant_id: str) -> str:
    with session_scope(factory) as session:
        job = repository.create_job(session, tenant_id=tenant_id, spec={"model": "m"}, dataset_id=None, queue="q")
        repository.request_cancel(session, job=job)
        return job.id


def _deliveries(factory: sessionmaker[Session], endpoint_id: str) -> list[WebhookDelivery]:
    with session_scope(factory) as session:
        rows, _ = webhook_store.list_deliveries(session, endpoint_id=endpoint_id, limit=100, after=None)
        return rows


def _attempts(factory: sessionmaker[Session], delivery_id: str) -> list[tuple[int | None, str | None]]:
    with session_scope(factory) as session:
        found = webhook_store.attempts_of(session, delivery_ids=[delivery_id])[delivery_id]
        return [(attempt.status_code, attempt.error) for attempt in found]


def test_an_event_is_delivered_signed_and_logged(
    factory: sessionmaker[Session], tenant_id: str, receiver: Receiver, pg_url: str
) -> None:
    first, second = _endpoint(factory, tenant_id, receiver.url), _endpoint(factory, tenant_id, receiver.url + "2")
    job_id = _cancelled_job(factory, tenant_id)
    assert dispatch_due(factory, _settings(pg_url)) == 2

    by_path = {request.path: request for request in receiver.requests}
    assert set(by_path) == {"/hook", "/hook2"}
    payload = by_path["/hook"].verified(first.secret)  # the reference library accepts the signature
    assert payload["type"] == "job.cancelled"
    assert payload["data"] == {"id": job_id, "object": "job", "status": "cancelled", "attempt": 0, "error": None}
    assert by_path["/hook2"].verified(second.secret) == payload
    with pytest.raises(WebhookVerificationError):
        by_path["/hook"].verified(second.secret)  # another endpoint's secret does not verify it
    # One message, one webhook-id for every endpoint; the log holds the attempt.
    (delivery,) = _deliveries(factory, first.id)
    assert by_path["/hook"].headers["webhook-id"] == by_path["/hook2"].headers["webhook-id"] == delivery.message_id
    assert (delivery.status, delivery.attempt_count, delivery.next_attempt_at) == ("succeeded", 1, None)
    assert _attempts(factory, delivery.id) == [(204, None)]
    assert dispatch_due(factory, _settings(pg_url)) == 0  # delivered once


def test_loopback_targets_are_refused_after_resolving_unless_allowed(
    factory: sessionmaker[Session], tenant_id: str, receiver: Receiver, pg_url: str
) -> None:
    # Written straight to the store: the API would refuse both URLs at creation.
    literal = _endpoint(factory, tenant_id, receiver.url)
    named = _endpoint(factory, tenant_id, f"http://localhost:{receiver.port}/hook")
    _cancelled_job(factory, tenant_id)
    dispatch_due(factory, _settings(pg_url, webhook_allowed_hosts="", webhook_retry_schedule_s="60"))
    assert receiver.requests == []
    for endpoint, needle in (
        (literal, "127.0.0.1 resolves to 127.0.0.1, a loopback"),
        (named, "localhost resolves to "),
    ):
        (delivery,) = _deliveries(factory, endpoint.id)
        ((status_code, error),) = _attempts(factory, delivery.id)
        assert status_code is None and error is not None and error.startswith("refused: ") and needle in error
        assert "loopback address" in error and delivery.status == "pending"  # its next retry is scheduled


def test_an_allowed_name_is_resolved_once_and_the_connection_pinned_to_its_address(
    factory: sessionmaker[Session], tenant_id: str, receiver: Receiver, pg_url: str
) -> None:
    endpoint = _endpoint(factory, tenant_id, f"http://localhost:{receiver.port}/named")
    _cancelled_job(factory, tenant_id)
    assert dispatch_due(factory, _settings(pg_url, webhook_allowed_hosts="localhost")) == 1
    (request,) = receiver.requests
    # Sent to the address checked (the URL's host rewritten), with the name the tenant gave in Host.
    assert (request.path, request.headers["Host"]) == ("/named", f"localhost:{receiver.port}")
    assert request.verified(endpoint.secret)["type"] == "job.cancelled"


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
    factory: sessionmaker[Session], tenant_id: str, pg_url: str
) -> None:
    receiver = Receiver(iter([302]))
    try:
        endpoint = _endpoint(factory, tenant_id, receiver.url)
        _cancelled_job(factory, tenant_id)
        dispatch_due(factory, _settings(pg_url, webhook_retry_schedule_s="60"))
        assert [request.path for request in receiver.requests] == ["/hook"]
        (delivery,) = _deliveries(factory, endpoint.id)
        assert _attempts(factory, delivery.id) == [(302, "HTTP 302: redirects are not followed")]
    finally:
        receiver.close()


def test_retries_then_failure_then_the_endpoint_is_disabled_and_re_enabled(
    factory: sessionmaker[Session], tenant_id: str, pg_url: str
) -> None:
    receiver = Receiver(repeat(500))
    settings = _settings(pg_url, webhook_retry_schedule_s="0", webhook_disable_after=2)
    try:
        endpoint = _endpoint(factory, tenant_id, receiver.url)
        for message in (1, 2):
            _cancelled_job(factory, tenant_id)
            assert dispatch_due(factory, settings) == 1  # first attempt; the one retry is due at once
            assert dispatch_due(factory, settings) == 1
            assert dispatch_due(factory, settings) == 0  # no retry left: failed
            delivery = _deliveries(factory, endpoint.id)[0]
            assert (delivery.status, delivery.attempt_count) == ("failed", 2)
            assert _attempts(factory, delivery.id) == [(500, "HTTP 500")] * 2
            with session_scope(factory) as session:
                stored = webhook_store.get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint.id)
                assert stored is not None and stored.consecutive_failures == message
                assert (stored.disabled_at is not None) == (message == 2)
        assert stored.disabled_reason is not None and stored.disabled_reason.startswith("2 messages in a row failed")
        _cancelled_job(factory, tenant_id)  # a disabled endpoint is sent nothing new
        assert len(_deliveries(factory, endpoint.id)) == 2

        # Redelivered after re-enabling: same message, a new round of attempts; success resets the count.
        receiver.answers = iter(())
        with session_scope(factory) as session:
            stored = webhook_store.get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint.id)
            assert stored is not None
            webhook_store.set_enabled(session, endpoint=stored, enabled=True)
            last = webhook_store.get_delivery(session, endpoint_id=endpoint.id, delivery_id=delivery.id)
            assert last is not None
            webhook_store.redeliver(session, delivery=last)
        assert dispatch_due(factory, settings) == 1
        assert receiver.requests[-1].headers["webhook-id"] == delivery.message_id
        assert _attempts(factory, delivery.id)[-1] == (204, None)
    finally:
        receiver.close()


def test_claims_are_exclusive_and_the_outbox_commits_with_the_status(
    factory: sessionmaker[Session], tenant_id: str
) -> None:
    endpoint = _endpoint(factory, tenant_id, "http://127.0.0.1:9/never-sent")
    # A status change that rolls back leaves no event behind.
    with factory() as session:
        job = repository.create_job(session, tenant_id=tenant_id, spec={"model": "m"}, dataset_id=None, queue="q")
        repository.request_cancel(session, job=job)
        assert session.scalar(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
        session.rollback()
    assert _deliveries(factory, endpoint.id) == []
    _cancelled_job(factory, tenant_id)
    # Two workers claiming together: the second skips the row the first holds, then finds it leased.
    with factory() as first, factory() as second:
        taken = webhook_store.claim_due(first, lease_s=60, limit=10)
        assert [due.url for due in taken] == [endpoint.url]
        assert webhook_store.claim_due(second, lease_s=60, limit=10) == []
        first.commit()
        assert webhook_store.claim_due(second, lease_s=60, limit=10) == []


def test_the_embedded_sqlite_store_delivers_too(tmp_path: Path, receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path / 'dama.db'}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as session:
            tenant_id = repository.get_or_create_tenant(session, name="embedded").id
        endpoint = _endpoint(factory, tenant_id, receiver.url)
        job_id = _cancelled_job(factory, tenant_id)
        with factory() as first, factory() as second:
            assert len(webhook_store.claim_due(first, lease_s=0.5, limit=10)) == 1
            first.commit()
            assert webhook_store.claim_due(second, lease_s=60, limit=10) == []  # leased
        time.sleep(0.6)  # the lease of a claim whose worker never reported ran out: sent again (at least once)
        assert dispatch_due(factory, _settings(url)) == 1
        (request,) = receiver.requests
        assert request.verified(endpoint.secret)["data"]["id"] == job_id  # type: ignore[index]
        with session_scope(factory) as session:
            assert session.get(Job, job_id) is not None
        assert _deliveries(factory, endpoint.id)[0].status == "succeeded"
    finally:
        engine.dispose()
