"""The job store on the real Postgres: state machine, claiming, events, keys, idempotency, the sweeper's queries."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from threading import Barrier, Thread

import pytest
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository as repo
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import utcnow
from jobstore.settings import Settings
from jobstore.states import ErrorKind, IllegalTransition, JobStatus, check_transition


@pytest.fixture
def factory(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()


def _job(factory: sessionmaker[Session]) -> tuple[str, str]:
    with session_scope(factory) as session:
        tenant = repo.get_or_create_tenant(session, name=f"t-{utcnow().timestamp()}")
        job = repo.create_job(session, tenant_id=tenant.id, spec={"model": "m"}, dataset_id=None, queue="q")
        return tenant.id, job.id


def test_state_machine_refuses_illegal_transitions() -> None:
    assert check_transition("queued", "running") == JobStatus.running
    assert check_transition("running", "queued") == JobStatus.queued  # the sweeper's re-queue
    for current, target in [("succeeded", "running"), ("cancelled", "queued"), ("queued", "succeeded")]:
        with pytest.raises(IllegalTransition):
            check_transition(current, target)


def test_only_one_of_two_racing_workers_claims_a_job(factory: sessionmaker[Session]) -> None:
    _, job_id = _job(factory)
    barrier = Barrier(2)
    results: list[str | None] = []

    def claim(worker: str) -> None:
        barrier.wait()
        with session_scope(factory) as session:
            job = repo.claim_job(session, job_id=job_id, worker=worker)
            results.append(job.worker if job else None)

    threads = [Thread(target=claim, args=(f"w{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results.count(None) == 1  # exactly one worker won
    with session_scope(factory) as session:
        job = repo.get_job(session, job_id=job_id)
        assert job is not None and job.status == "running" and job.attempts == 1
        # A redelivered message for the same job is a no-op.
        assert repo.claim_job(session, job_id=job_id, worker="w9") is None


def test_events_are_numbered_in_order_and_paginate(factory: sessionmaker[Session]) -> None:
    _, job_id = _job(factory)
    with session_scope(factory) as session:
        repo.add_events(session, job_id=job_id, events=[("stage", f"stage {i}", {"i": i}) for i in range(5)])
    with session_scope(factory) as session:
        first, more = repo.list_events(session, job_id=job_id, after_seq=0, limit=4)
        assert [e.seq for e in first] == [1, 2, 3, 4] and more
        rest, more = repo.list_events(session, job_id=job_id, after_seq=4, limit=4)
        assert [e.seq for e in rest] == [5, 6] and not more
        assert first[0].type == "status" and rest[-1].message == "stage 4"


def test_cancel_and_finish_follow_the_state_machine(factory: sessionmaker[Session]) -> None:
    _, queued_id = _job(factory)
    _, running_id = _job(factory)
    with session_scope(factory) as session:
        assert repo.request_cancel(session, job=repo.get_job(session, job_id=queued_id)).status == "cancelled"  # type: ignore[arg-type]
        repo.claim_job(session, job_id=running_id, worker="w")
        job = repo.get_job(session, job_id=running_id)
        assert job is not None
        assert repo.request_cancel(session, job=job).status == "cancelling"
        repo.set_status(session, job=job, status="cancelled")
        assert job.finished_at is not None
        with pytest.raises(IllegalTransition):
            repo.request_cancel(session, job=job)


def test_stale_jobs_are_requeued_then_failed_after_the_limit(factory: sessionmaker[Session]) -> None:
    _, job_id = _job(factory)
    for attempt in (1, 2):
        with session_scope(factory) as session:
            assert repo.claim_job(session, job_id=job_id, worker=f"w{attempt}") is not None
        later = utcnow() + timedelta(seconds=1)
        with session_scope(factory) as session:
            assert job_id in repo.stale_jobs(session, older_than=later)
            stale = repo.lock_stale_job(session, job_id=job_id, older_than=later)
            assert stale is not None
            status = repo.recover_stale_job(session, job=stale, max_attempts=2)
        assert status == ("queued" if attempt == 1 else "failed")
    with session_scope(factory) as session:
        job = repo.get_job(session, job_id=job_id)
        assert job is not None and job.error_kind == ErrorKind.system_error.value and job.attempts == 2


def test_api_keys_are_stored_hashed_and_resolve_their_tenant(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        tenant = repo.get_or_create_tenant(session, name="keys-tenant")
        row, plaintext = repo.create_api_key(session, tenant_id=tenant.id, pepper="p" * 16)
        assert plaintext not in row.key_hash and len(row.key_hash) == 64
    with session_scope(factory) as session:
        found = repo.tenant_for_key(session, key=plaintext, pepper="p" * 16)
        assert found is not None and found.id == tenant.id
        assert repo.tenant_for_key(session, key=plaintext, pepper="q" * 16) is None
        assert repo.tenant_for_key(session, key=plaintext + "x", pepper="p" * 16) is None


def test_metric_series_by_key_and_resume_truncation(factory: sessionmaker[Session]) -> None:
    _, job_id = _job(factory)
    with session_scope(factory) as session:
        repo.add_metrics(session, job_id=job_id, points=[(s, k, s * 1.5) for s in (1, 2, 3) for k in ("loss", "lr")])
        repo.delete_metrics_after(session, job_id=job_id, step=2)
        series = repo.metric_series(session, job_id=job_id, keys=["loss"])
    assert series == {"loss": [[1, 1.5], [2, 3.0]]}


def test_production_settings_refuse_unsafe_defaults() -> None:
    with pytest.raises(ValueError, match="DAMA_API_KEY_PEPPER"):
        Settings(environment="production", database_url="postgresql+psycopg://x/y")
    with pytest.raises(ValueError, match="DAMA_DATABASE_URL"):
        Settings(environment="production", api_key_pepper="s" * 20)
    assert Settings().resolved_broker_url == "filesystem://"


def test_a_replaced_worker_cannot_keep_the_job_alive(factory: sessionmaker[Session]) -> None:
    _, job_id = _job(factory)
    with session_scope(factory) as session:
        job = repo.claim_job(session, job_id=job_id, worker="w-new")
        assert job is not None
        stamped = job.heartbeat_at
    with session_scope(factory) as session:
        repo.record_progress(session, job_id=job_id, step=5, worker="w-old", attempt=1)
    with session_scope(factory) as session:
        job = repo.get_job(session, job_id=job_id)
        assert job is not None and job.step == 0 and job.heartbeat_at == stamped
        repo.record_progress(session, job_id=job_id, step=5, worker="w-new", attempt=1)
    with session_scope(factory) as session:
        job = repo.get_job(session, job_id=job_id)
        assert job is not None and job.step == 5 and job.heartbeat_at is not None and job.heartbeat_at > stamped
