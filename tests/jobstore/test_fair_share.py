"""Fair share in the job store (``repository.claim_next_job``) on the real Postgres and on SQLite (the embedded
default, migrated with the real Alembic chain): who goes next, concurrent claims, locked rows, queues apart."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository as repo
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import Job, QueueTurn


@pytest.fixture
def queue() -> str:
    return f"fair-{secrets.token_hex(4)}"  # the Postgres database is shared by the session's tests


def _queue_jobs(factory: sessionmaker[Session], tenant: str, count: int, queue: str) -> list[str]:
    with session_scope(factory) as session:
        tenant_id = repo.get_or_create_tenant(session, name=f"{tenant}-{queue}").id
        return [
            repo.create_job(session, tenant_id=tenant_id, spec={"model": "m"}, dataset_id=None, queue=queue).id
            for _ in range(count)
        ]


def _claim(factory: sessionmaker[Session], queue: str, worker: str = "w") -> str | None:
    with session_scope(factory) as session:
        job = repo.claim_next_job(session, queue=queue, worker=worker)
        return job.id if job is not None else None


def _finish(factory: sessionmaker[Session], job_id: str) -> None:
    with session_scope(factory) as session:
        job = repo.get_job(session, job_id=job_id)
        assert job is not None
        repo.set_status(session, job=job, status="succeeded")


def test_a_tenant_behind_another_tenants_backlog_goes_second(factory: sessionmaker[Session], queue: str) -> None:
    a_jobs = _queue_jobs(factory, "a", 10, queue)
    (b_job,) = _queue_jobs(factory, "b", 1, queue)
    order = []
    while (job_id := _claim(factory, queue)) is not None:  # one worker: each job ends before the next claim
        order.append(job_id)
        _finish(factory, job_id)
    # Global FIFO would run B's job eleventh; a tenant's own jobs keep their order.
    assert order == [a_jobs[0], b_job, *a_jobs[1:]]
    with session_scope(factory) as session:
        jobs = session.scalars(select(Job).where(Job.queue == queue)).all()
        assert {(job.status, job.attempts) for job in jobs} == {("succeeded", 1)}
        claimed = [
            e for e in repo.list_events(session, job_id=b_job, after_seq=0, limit=10)[0] if "claimed" in e.message
        ]
        assert len(claimed) == 1 and claimed[0].message == "claimed by w (attempt 1)"


def test_fewest_running_first_then_the_tenant_served_longest_ago(factory: sessionmaker[Session], queue: str) -> None:
    a_jobs = _queue_jobs(factory, "a", 3, queue)
    b_jobs = _queue_jobs(factory, "b", 2, queue)
    (c_job,) = _queue_jobs(factory, "c", 1, queue)
    # Three workers, nothing ends: one job per tenant before anyone's second.
    first = [_claim(factory, queue, f"w{i}") for i in range(3)]
    assert first == [a_jobs[0], b_jobs[0], c_job]
    # A and B each run one; A was served longest ago.
    assert _claim(factory, queue, "w3") == a_jobs[1]
    # A now runs two, B one: B goes first although A's job is older.
    assert _claim(factory, queue, "w4") == b_jobs[1]
    assert _claim(factory, queue, "w5") == a_jobs[2]
    assert _claim(factory, queue, "w6") is None
    with session_scope(factory) as session:
        turns = session.scalars(select(QueueTurn).where(QueueTurn.queue == queue)).all()
        assert len(turns) == 3  # one row per tenant served on the queue, updated in place


def test_claims_take_only_their_own_queue(factory: sessionmaker[Session], queue: str) -> None:
    (other,) = _queue_jobs(factory, "a", 1, queue + "-other")
    assert _claim(factory, queue) is None
    (mine,) = _queue_jobs(factory, "b", 1, queue)
    assert _claim(factory, queue) == mine
    with session_scope(factory) as session:
        job = repo.get_job(session, job_id=other)
        assert job is not None and job.status == "queued"


def test_cancelled_and_running_jobs_are_not_claimed_again(factory: sessionmaker[Session], queue: str) -> None:
    first, second = _queue_jobs(factory, "a", 2, queue)
    with session_scope(factory) as session:
        job = repo.get_job(session, job_id=first)
        assert job is not None
        repo.request_cancel(session, job=job)
    assert _claim(factory, queue) == second
    assert _claim(factory, queue) is None  # a duplicate message finds nothing: the running job is not taken again


@pytest.fixture
def pg_factory(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()


def test_workers_claiming_at_once_spread_over_tenants(pg_factory: sessionmaker[Session], queue: str) -> None:
    """Eight workers claiming at once get eight tenants' jobs: each passes over the heads the others hold. Choosing
    among all queued jobs, each would count the same tenant as owed a turn and take the next of its jobs."""
    tenants = {tenant: _queue_jobs(pg_factory, tenant, 3, queue) for tenant in "abcdefgh"}
    owner = {job_id: tenant for tenant, jobs in tenants.items() for job_id in jobs}
    barrier = threading.Barrier(8)
    claimed: list[str | None] = []

    def claim(worker: str) -> None:
        barrier.wait()
        claimed.append(_claim(pg_factory, queue, worker))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert None not in claimed and len(set(claimed)) == 8
    assert sorted(owner[job_id] for job_id in claimed if job_id) == list("abcdefgh")


def test_a_locked_job_is_passed_over_not_waited_for(pg_factory: sessionmaker[Session], queue: str) -> None:
    """A row another transaction holds (a cancel deciding on it, say) is skipped: the claim takes the next job."""
    first, second = _queue_jobs(pg_factory, "a", 2, queue)
    holder = pg_factory()
    try:
        holder.execute(select(Job.id).where(Job.id == first).with_for_update())
        assert _claim(pg_factory, queue) == second
    finally:
        holder.rollback()
        holder.close()
    assert _claim(pg_factory, queue) == first


def test_workers_claiming_one_tenants_backlog_at_once_all_get_a_job(
    pg_factory: sessionmaker[Session], queue: str
) -> None:
    """With one tenant waiting, its head is held by the first claim: the others take the jobs behind it (no
    message may be spent claiming nothing while jobs wait)."""
    jobs = _queue_jobs(pg_factory, "solo", 6, queue)
    barrier = threading.Barrier(4)
    claimed: list[str | None] = []

    def claim(worker: str) -> None:
        barrier.wait()
        claimed.append(_claim(pg_factory, queue, worker))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert None not in claimed and len(set(claimed)) == 4 and set(claimed) <= set(jobs)
