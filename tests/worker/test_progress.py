"""The engine callback against the real job store: buffered metrics, cancellation, lost runs, a dead database."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import update

from jobstore import repository
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import Job
from tests.worker.conftest import JobStore, tiny_spec
from worker.progress import JobReporter, JobStopped, RunOwner


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _claimed(store: JobStore) -> RunOwner:
    job_id = store.create_job(tiny_spec(store.dataset(48)), queue="in-process")
    with session_scope(store.factory) as session:
        job = repository.claim_job(session, job_id=job_id, worker="pytest:2")
        assert job is not None
        return RunOwner(job_id=job_id, worker="pytest:2", attempt=job.attempts)


def _end(store: JobStore, job_id: str) -> None:
    with session_scope(store.factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="failed"))


def test_metrics_are_buffered_and_flushed_with_progress_and_eta(store: JobStore) -> None:
    owner, clock = _claimed(store), Clock()
    reporter = JobReporter(owner=owner, session_factory=store.factory, flush_interval_s=1.0, clock=clock)
    reporter.on_stage("training", {"steps": 10, "resumed_from_step": 0})
    for step in (1, 2, 3):
        clock.now += 0.2
        reporter.on_step(step, 10, {"loss": 0.7 - step / 100, "lr": 1e-3})
    assert store.metric_series(owner.job_id) == {}  # within the flush interval: nothing written yet
    clock.now += 0.5
    reporter.on_step(4, 10, {"loss": 0.6, "lr": 1e-3})  # 1.1 s after the last flush
    assert [step for step, _ in store.metric_series(owner.job_id)["loss"]] == [1, 2, 3, 4]
    job = store.job(owner.job_id)
    assert (job.stage, job.step, job.total_steps, job.progress) == ("training", 4, 10, 0.4)
    assert job.eta_seconds == pytest.approx(6 * 1.1 / 4)  # 6 steps left at the measured 1.1 s per 4 steps
    reporter.on_checkpoint(4, Path("/runs/checkpoints/step-000004"))
    assert store.checkpoint_steps(owner.job_id) == [4]
    _end(store, owner.job_id)


def test_a_cancel_stops_training_at_the_next_poll_and_aborts_other_stages(store: JobStore) -> None:
    owner, clock = _claimed(store), Clock()
    reporter = JobReporter(owner=owner, session_factory=store.factory, flush_interval_s=1.0, clock=clock)
    reporter.on_stage("reference", {"pairs": 48})
    assert not reporter.should_stop()
    with session_scope(store.factory) as session:
        job = repository.get_job(session, job_id=owner.job_id)
        assert job is not None
        repository.request_cancel(session, job=job)
    assert not reporter.should_stop()  # the cached status is younger than the poll interval
    clock.now += 0.6
    assert reporter.should_stop() and reporter.stop_reason == "cancelled"
    with pytest.raises(JobStopped) as stopped:
        reporter.on_progress("reference", 10, 48)  # no step boundary here: the stage is abandoned
    assert stopped.value.reason == "cancelled"
    _end(store, owner.job_id)


def test_a_run_given_to_another_worker_stops_and_writes_nothing(store: JobStore) -> None:
    owner, clock = _claimed(store), Clock()
    reporter = JobReporter(owner=owner, session_factory=store.factory, flush_interval_s=0.0, clock=clock)
    reporter.on_stage("training", {"steps": 10})
    with session_scope(store.factory) as session:  # the sweeper declared it dead; another worker took it
        session.execute(update(Job).where(Job.id == owner.job_id).values(worker="other:9", attempts=2))
    reporter.on_step(1, 10, {"loss": 0.5})
    assert reporter.stop_reason == "lost" and reporter.should_stop()
    assert store.metric_series(owner.job_id) == {}
    _end(store, owner.job_id)


def test_a_shutdown_request_stops_at_the_next_step(store: JobStore) -> None:
    owner, shutdown = _claimed(store), threading.Event()
    reporter = JobReporter(owner=owner, session_factory=store.factory, flush_interval_s=1.0, shutdown=shutdown)
    assert not reporter.should_stop()
    shutdown.set()
    assert reporter.should_stop() and reporter.stop_reason == "shutdown"
    _end(store, owner.job_id)


def test_an_unreachable_job_store_never_breaks_the_run() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1")
    owner = RunOwner(job_id="job_x", worker="pytest:3", attempt=1)
    reporter = JobReporter(owner=owner, session_factory=make_session_factory(engine), flush_interval_s=0.0)
    reporter.on_stage("training", {"steps": 3})
    reporter.on_step(1, 3, {"loss": 0.5})
    reporter.on_eval(1, {"eval_accuracy": 0.5, "eval_margin": 0.0})
    reporter.on_checkpoint(1, Path("/nowhere"))
    assert not reporter.should_stop()
    reporter.close()
    assert len(reporter._points) == 3  # kept for the next flush
    engine.dispose()


def test_idle_time_counts_engine_reports_not_stop_polls(store: JobStore) -> None:
    """What the stall watchdog reads: stages, progress, steps and launcher-seen output reset it; polls do not."""
    owner, clock = _claimed(store), Clock()
    reporter = JobReporter(owner=owner, session_factory=store.factory, flush_interval_s=1.0, clock=clock)
    clock.now += 30
    assert reporter.idle_s() == 30
    reporter.on_stage("reference", {"pairs": 48})
    assert reporter.idle_s() == 0
    clock.now += 5
    reporter.on_progress("reference", 8, 48)
    assert reporter.idle_s() == 0
    clock.now += 7
    reporter.should_stop()  # a poll is not progress
    assert reporter.idle_s() == 7
    reporter.on_activity()  # e.g. torchrun's rank 0 wrote to its log
    assert reporter.idle_s() == 0
    clock.now += 2
    reporter.on_stage("training", {"steps": 4, "resumed_from_step": 0})
    clock.now += 3
    reporter.on_step(1, 4, {"loss": 0.6})
    assert reporter.idle_s() == 0
    _end(store, owner.job_id)
