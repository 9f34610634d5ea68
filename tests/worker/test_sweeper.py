"""The sweeper on real Postgres and Redis: dead runs re-queued and sent again, or failed after the attempt limit;
lost messages sent again; concurrent sweepers never recover one run twice."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from celery import Celery
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from jobstore import repository
from jobstore.broker import RUN_JOB_TASK, enqueue_job, make_celery
from jobstore.db import session_scope
from jobstore.models import Job, utcnow
from tests.worker.conftest import QUEUE_PREFIX, JobStore, tiny_spec
from worker.sweeper import queued_messages, sweep

QUEUE = f"{QUEUE_PREFIX}-sweeper"


@pytest.fixture
def app(store: JobStore) -> Iterator[Celery]:
    celery_app = make_celery(store.settings)
    yield celery_app
    celery_app.close()


@pytest.fixture
def queue(store: JobStore, redis_url: str) -> Iterator[redis.Redis]:
    """The sweeper tests' queue in Redis, emptied before and after each test; the test's jobs end after it."""
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE)
    yield client
    client.delete(QUEUE)
    with session_scope(store.factory) as session:
        session.execute(
            update(Job)
            .where(Job.queue == QUEUE, Job.status.in_(["queued", "running", "cancelling"]))
            .values(status="failed", error_kind="system_error", error_message="ended by the test")
        )


def _sent_job_ids(client: redis.Redis) -> list[str]:
    messages = [json.loads(raw) for raw in client.lrange(QUEUE, 0, -1)]
    assert all(message["headers"]["task"] == RUN_JOB_TASK for message in messages)
    # Celery's message protocol 2: the body is base64 JSON of [args, kwargs, embed].
    return [json.loads(base64.b64decode(message["body"]))[0][0] for message in messages]


def _dead_run(store: JobStore, *, attempts: int = 1, status: str = "running", silent_s: float = 60.0) -> str:
    """A job claimed by a worker that then went silent ``silent_s`` ago (after ``attempts`` claims)."""
    job_id = store.create_job(tiny_spec(store.dataset(48)), queue=QUEUE)
    with session_scope(store.factory) as session:
        job = repository.claim_job(session, job_id=job_id, worker="dead-worker:1")
        assert job is not None
        if status == "cancelling":
            repository.request_cancel(session, job=job)
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(attempts=attempts, heartbeat_at=utcnow() - timedelta(seconds=silent_s))
        )
    return job_id


def _status_messages(store: JobStore, job_id: str) -> list[str]:
    return [message for kind, message, _ in store.events(job_id) if kind == "status"]


def test_a_dead_run_is_requeued_and_sent_again(store: JobStore, app: Celery, queue: redis.Redis) -> None:
    job_id = _dead_run(store, attempts=1)
    done = sweep(store.factory, app, store.settings)
    assert done["requeued"] >= 1
    job = store.job(job_id)
    assert (job.status, job.worker, job.attempts) == ("queued", None, 1)
    assert "stopped responding; re-queued (attempt 1 of 3)" in _status_messages(store, job_id)[-1]
    assert _sent_job_ids(queue) == [job_id]
    # A second pass finds nothing to do for it: the job is queued, its message waits in the queue.
    sweep(store.factory, app, store.settings)
    assert store.job(job_id).status == "queued" and _sent_job_ids(queue) == [job_id]


def test_a_run_with_a_fresh_heartbeat_is_left_alone(store: JobStore, app: Celery, queue: redis.Redis) -> None:
    job_id = _dead_run(store, silent_s=0.0)
    sweep(store.factory, app, store.settings)
    assert store.job(job_id).status == "running"
    assert job_id not in _sent_job_ids(queue)
    with session_scope(store.factory) as session:
        job = repository.get_job(session, job_id=job_id)
        assert job is not None
        repository.set_status(session, job=job, status="failed")


def test_a_run_fails_after_max_attempts_with_a_system_error(store: JobStore, app: Celery, queue: redis.Redis) -> None:
    job_id = _dead_run(store, attempts=store.settings.max_attempts)
    sweep(store.factory, app, store.settings)
    job = store.job(job_id)
    assert job.status == "failed"
    assert job.error_kind == "system_error"
    assert job.error_message == f"the worker stopped responding {store.settings.max_attempts} times; giving up"
    assert job.finished_at is not None
    assert job_id not in _sent_job_ids(queue)


def test_a_dead_run_being_cancelled_ends_cancelled(store: JobStore, app: Celery, queue: redis.Redis) -> None:
    job_id = _dead_run(store, status="cancelling")
    sweep(store.factory, app, store.settings)
    assert store.job(job_id).status == "cancelled"
    assert job_id not in _sent_job_ids(queue)


def test_a_run_locked_by_another_sweeper_is_skipped(store: JobStore, app: Celery, queue: redis.Redis) -> None:
    job_id = _dead_run(store)
    silent_since = utcnow() - timedelta(seconds=store.settings.heartbeat_timeout_s)
    with session_scope(store.factory) as other_sweeper:
        locked = repository.lock_stale_job(other_sweeper, job_id=job_id, older_than=silent_since)
        assert locked is not None
        # While the other sweeper holds the row, this one skips it instead of waiting or recovering it too.
        sweep(store.factory, app, store.settings)
        assert job_id not in _sent_job_ids(queue)
        repository.recover_stale_job(other_sweeper, job=locked, max_attempts=3)
    # Recovered once: one re-queue event, and a later pass leaves it alone.
    sweep(store.factory, app, store.settings)
    assert sum("re-queued" in message for message in _status_messages(store, job_id)) == 1
    assert store.job(job_id).status == "queued"


def test_a_queued_job_whose_message_was_lost_is_sent_again(store: JobStore, app: Celery, queue: redis.Redis) -> None:
    job_id = store.create_job(tiny_spec(store.dataset(48)), queue=QUEUE)  # committed, never sent
    sweep(store.factory, app, store.settings)
    assert job_id not in _sent_job_ids(queue)  # too recent: the API may be sending it right now
    with session_scope(store.factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - timedelta(minutes=5)))
    assert sweep(store.factory, app, store.settings)["resent"] >= 1
    assert job_id in _sent_job_ids(queue)
    # Its message now waits in the queue: the next pass does not send another one.
    sweep(store.factory, app, store.settings)
    assert _sent_job_ids(queue).count(job_id) == 1


def test_queued_jobs_are_not_resent_while_their_queue_holds_messages(
    store: JobStore, app: Celery, queue: redis.Redis
) -> None:
    waiting = store.create_job(tiny_spec(store.dataset(48)), queue=QUEUE)
    enqueue_job(app, job_id=waiting, queue=QUEUE)
    with session_scope(store.factory) as session:
        session.execute(update(Job).where(Job.id == waiting).values(updated_at=utcnow() - timedelta(minutes=5)))
    assert queued_messages(app, QUEUE) == 1
    sweep(store.factory, app, store.settings)
    assert _sent_job_ids(queue) == [waiting]
    queue.delete(QUEUE)
    assert queued_messages(app, QUEUE) == 0


def test_a_hung_run_is_given_up_and_requeued(
    store: JobStore, app: Celery, queue: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DAMA_STALL_TIMEOUT_S: a run whose engine goes silent (a hung CUDA call, say) while its heartbeat thread lives
    on gets a 'stalled' event, its heartbeats stop, on_stall runs (in production: the worker exits), the sweeper
    re-queues the job, and the hung call returning late cannot overwrite anything."""
    import threading
    import time

    from worker import tasks

    released, stalls = threading.Event(), []

    def hang(config: object, callback: tasks.JobReporter) -> None:
        callback.on_stage("loading_model", {"model": "tiny"})
        released.wait(60)
        raise RuntimeError("the hung call returned late")

    monkeypatch.setattr(tasks, "train", hang)
    settings = store.settings.model_copy(
        update={"stall_timeout_s": 1.0, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.5}
    )
    job_id = store.create_job(tiny_spec(store.dataset(8)), queue=QUEUE)
    outcome: list[str | None] = []
    runner = threading.Thread(
        target=lambda: outcome.append(
            tasks.run_job(
                job_id, session_factory=store.factory, settings=settings, worker="pytest:hung", on_stall=stalls.append
            )
        )
    )
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while not stalls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalls and stalls[0] > 1.0, "the watchdog did not fire"
        stalled = [event for event in store.events(job_id) if event[0] == "stalled"]
        assert len(stalled) == 1 and "treated as hung" in stalled[0][1] and stalled[0][2]["attempt"] == 1
        beat = store.job(job_id).heartbeat_at
        time.sleep(0.6)
        assert store.job(job_id).heartbeat_at == beat, "heartbeats must stop once the run is given up"
        assert store.job(job_id).status == "running"

        time.sleep(1.5)  # heartbeat_timeout_s after the last heartbeat
        done = sweep(store.factory, app, settings)
        assert done["requeued"] == 1
        job = store.job(job_id)
        assert job.status == "queued" and job.worker is None
        assert _sent_job_ids(queue) == [job_id]
    finally:
        released.set()
        runner.join(timeout=30)
    # The hung call came back and failed: that attempt no longer owns the job, so nothing is recorded for it.
    assert outcome == [None]
    assert store.job(job_id).status == "queued" and store.job(job_id).error_kind is None


def test_the_default_stall_action_ends_the_worker_process() -> None:
    import subprocess
    import sys

    code = "from worker.tasks import exit_stalled_worker; exit_stalled_worker(7200.0); print('still alive')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    from worker.tasks import STALL_EXIT_CODE

    assert result.returncode == STALL_EXIT_CODE and "still alive" not in result.stdout
    assert "no progress for 7200 s" in result.stderr


def test_a_silence_the_job_store_caused_is_not_held_against_a_run(
    store: JobStore, app: Celery, queue: redis.Redis
) -> None:
    """After this sweeper could not reach the job store, a run counts as stale only once a heartbeat has had
    heartbeat_timeout_s to land since the store came back: a run that finished during the outage and waits to
    record its outcome is not re-queued and redone."""
    import time

    from jobstore.db import make_engine, make_session_factory
    from worker.sweeper import StoreWatch

    settings = store.settings.model_copy(update={"heartbeat_timeout_s": 1.0})
    job_id = _dead_run(store, silent_s=60.0)  # silent for the whole outage
    watch = StoreWatch()
    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1")
    with pytest.raises(OperationalError):
        sweep(make_session_factory(down), app, settings, watch)
    down.dispose()
    assert sweep(store.factory, app, settings, watch)["requeued"] == 0  # the store is back: give heartbeats time
    assert store.job(job_id).status == "running" and job_id not in _sent_job_ids(queue)
    time.sleep(1.2)  # heartbeat_timeout_s since the store came back, and still silent: now it is dead
    assert sweep(store.factory, app, settings, watch)["requeued"] >= 1
    assert store.job(job_id).status == "queued" and _sent_job_ids(queue) == [job_id]
