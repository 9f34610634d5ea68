"""Webhooks delivered by real Celery worker processes (their dispatcher thread) from the Postgres outbox to a
receiver on the loopback address (the worker's DAMA_WEBHOOK_ALLOWED_HOSTS is 127.0.0.1): a job's events as
the worker runs it, and a retry that survives the worker being killed during its backoff."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from jobstore import repository, webhook_store
from jobstore.broker import enqueue_job, make_celery
from jobstore.db import session_scope
from jobstore.models import WebhookEndpoint
from tests.worker.conftest import QUEUE_PREFIX, JobStore, WorkerProcess, tiny_spec, wait_for
from tests.worker.webhook_receiver import Receiver, keep_only_endpoints_of

pytestmark = pytest.mark.slow

QUEUE = f"{QUEUE_PREFIX}-webhooks"
RETRY_S = 8.0  # the one retry's delay: long enough to kill and replace the worker in between


@pytest.fixture(scope="module")
def hook_store(store: JobStore) -> Iterator[JobStore]:
    """The worker tests' job store, with a retry schedule of one short retry and loopback allowed."""
    settings = store.settings.model_copy(
        update={"webhook_allowed_hosts": "127.0.0.1", "webhook_retry_schedule_s": f"{RETRY_S:g}", "webhook_poll_s": 0.2}
    )
    with session_scope(store.factory) as session:
        keep_only_endpoints_of(session, store.tenant_id)
    yield JobStore(settings=settings, factory=store.factory, tenant_id=store.tenant_id, datasets=store.datasets)
    with session_scope(store.factory) as session:
        session.query(WebhookEndpoint).filter(WebhookEndpoint.tenant_id == store.tenant_id).delete()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def _endpoint(store: JobStore, url: str, event_types: list[str]) -> WebhookEndpoint:
    with session_scope(store.factory) as session:
        return webhook_store.create_endpoint(session, tenant_id=store.tenant_id, url=url, event_types=event_types)


def test_a_workers_job_events_reach_the_receiver(hook_store: JobStore, receiver: Receiver, tmp_path: Path) -> None:
    endpoint = _endpoint(hook_store, receiver.url, ["job.running", "job.succeeded", "job.failed"])
    # A job whose dataset is missing: the worker claims it (job.running) and fails it at once (job.failed).
    spec = tiny_spec(f"ds_missing{secrets.token_hex(4)}")
    with session_scope(hook_store.factory) as session:
        job_id = repository.create_job(
            session, tenant_id=hook_store.tenant_id, spec=spec, dataset_id=None, queue=QUEUE
        ).id
    app: Celery = make_celery(hook_store.settings)
    worker = WorkerProcess(hook_store.settings, QUEUE, tmp_path, "hooks-events")
    try:
        enqueue_job(app, job_id=job_id, queue=QUEUE)
        wait_for(lambda: len(receiver.requests) >= 2, timeout=90, interval=0.1, what="two webhooks")
    except AssertionError:
        pytest.fail(f"job {hook_store.job(job_id).status}; worker log:\n{worker.log()}")
    finally:
        worker.stop()
        app.close()
    payloads = [request.verified(endpoint.secret) for request in receiver.requests]
    assert [payload["type"] for payload in payloads] == ["job.running", "job.failed"]
    failed = payloads[1]["data"]
    assert isinstance(failed, dict) and failed["id"] == job_id and failed["status"] == "failed"
    assert failed["error"]["kind"] == "user_error"
    assert hook_store.job(job_id).status == "failed"
    with session_scope(hook_store.factory) as session:
        rows, _ = webhook_store.list_deliveries(session, endpoint_id=endpoint.id, limit=10, after=None)
        assert {row.status for row in rows} == {"succeeded"}
        assert {row.message_id for row in rows} == {request.headers["webhook-id"] for request in receiver.requests}


def _attempt_count(store: JobStore, endpoint_id: str) -> int:
    with session_scope(store.factory) as session:
        rows, _ = webhook_store.list_deliveries(session, endpoint_id=endpoint_id, limit=10, after=None)
        return sum(row.attempt_count for row in rows)


def test_a_retry_survives_a_worker_killed_during_its_backoff(hook_store: JobStore, tmp_path: Path) -> None:
    receiver = Receiver(iter([503]))  # the first attempt fails, the retry is answered
    try:
        endpoint = _endpoint(hook_store, receiver.url, ["job.cancelled"])
        first = WorkerProcess(hook_store.settings, QUEUE, tmp_path, "hooks-before")
        with session_scope(hook_store.factory) as session:
            job = repository.create_job(
                session, tenant_id=hook_store.tenant_id, spec={"model": "m"}, dataset_id=None, queue=QUEUE
            )
            repository.request_cancel(session, job=job)
        wait_for(lambda: _attempt_count(hook_store, endpoint.id) == 1, timeout=30, interval=0.05, what="attempt 1")
        first.kill()  # SIGKILL in the backoff: nothing of the retry lives in this process
        assert len(receiver.requests) == 1
        second = WorkerProcess(hook_store.settings, QUEUE, tmp_path, "hooks-after")
        try:
            wait_for(lambda: len(receiver.requests) == 2, timeout=60, interval=0.1, what="the retry")
        finally:
            second.stop()
        before, after = receiver.requests
        assert before.headers["webhook-id"] == after.headers["webhook-id"]  # the same message, retried
        assert before.verified(endpoint.secret) == after.verified(endpoint.secret)
        assert after.at - before.at >= RETRY_S - 0.5
        with session_scope(hook_store.factory) as session:
            (delivery,) = webhook_store.list_deliveries(session, endpoint_id=endpoint.id, limit=10, after=None)[0]
            attempts = webhook_store.attempts_of(session, delivery_ids=[delivery.id])[delivery.id]
            assert (delivery.status, [attempt.status_code for attempt in attempts]) == ("succeeded", [503, 204])
    finally:
        receiver.close()
