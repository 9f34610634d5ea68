"""The engine callback against the real job store: buffered metrics, cancellation, lost runs, a dead database,
an outage's backlog (spilled to disk, delivered in order, once), commits whose outcome was never heard."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import Job
from jobstore.states import JobStatus
from tests.worker.conftest import JobStore, tiny_spec
from worker import progress, tasks
from worker.outbox import Outbox
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


def test_metrics_are_buffered_and_flushed_with_progress_and_eta(store: JobStore, tmp_path: Path) -> None:
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
    checkpoint = tmp_path / "checkpoints" / "step-000004"
    checkpoint.mkdir(parents=True)  # the engine writes it before it reports it
    reporter.on_checkpoint(4, checkpoint)
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
    assert not reporter.close(wait_s=0.0)
    # Kept for when the store answers: the stage and evaluation events, 3 metric points, the checkpoint and its event.
    assert len(reporter.outbox) == 7
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


DOWN_URL = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1"  # refused at once: "down"


class Switch:
    """A session factory for a job store the test takes down (sessions on a refused port) and brings back."""

    def __init__(self, up: sessionmaker[Session]) -> None:
        self.up = up
        self.engine = make_engine(DOWN_URL)
        self.down_factory = make_session_factory(self.engine)
        self.down = False

    def __call__(self) -> Session:
        return (self.down_factory if self.down else self.up)()


class UnheardCommits:
    """Sessions whose first ``count`` commits land but answer with a lost connection, as when the database goes
    away during COMMIT: the writer cannot tell whether its rows are stored."""

    def __init__(self, factory: sessionmaker[Session], count: int) -> None:
        self.factory, self.left = factory, count

    def __call__(self) -> Session:
        session = self.factory()
        commit = session.commit

        def commit_unheard() -> None:
            commit()
            if self.left > 0:
                self.left -= 1
                raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

        session.commit = commit_unheard  # type: ignore[method-assign]
        return session


def test_a_long_outage_spills_to_disk_and_everything_arrives_in_order_once(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "BATCH_REPORTS", 100)  # the backlog goes out in several transactions
    owner, clock, switch = _claimed(store), Clock(), Switch(store.factory)
    factory = cast(sessionmaker[Session], switch)
    reporter = JobReporter(
        owner=owner, session_factory=factory, flush_interval_s=0.0, clock=clock, spool_dir=tmp_path, memory_limit=50
    )
    reporter.on_stage("training", {"steps": 300})
    switch.down = True
    checkpoints = tmp_path / "checkpoints"
    for step in range(1, 301):
        clock.now += 1.0  # past every backoff delay: each step tries the store again, and fails
        reporter.on_step(step, 300, {"loss": 1.0 / step, "lr": 1e-3})
        if step in (100, 200):
            (checkpoints / f"step-{step:06d}").mkdir(parents=True)
            reporter.on_checkpoint(step, checkpoints / f"step-{step:06d}")
    shutil.rmtree(checkpoints / "step-000100")  # pruned by the engine before the store came back
    assert not reporter.should_stop()
    assert len(reporter.outbox) == 600 + 2 * 2 and reporter.outbox.spilled >= 550  # memory holds at most 50
    assert store.metric_series(owner.job_id) == {}

    switch.down = False
    assert reporter.close(wait_s=5.0)
    series = store.metric_series(owner.job_id)
    assert [step for step, _ in series["loss"]] == list(range(1, 301))
    assert [value for _, value in series["loss"]] == [1.0 / step for step in range(1, 301)]
    assert [step for step, _ in series["lr"]] == list(range(1, 301))
    kinds = [(kind, (data or {}).get("step")) for kind, _, data in store.events(owner.job_id)[1:]]
    assert kinds == [("status", None), ("stage", None), ("checkpoint", 100), ("checkpoint", 200)]
    assert store.checkpoint_steps(owner.job_id) == [200]  # what is still on disk
    job = store.job(owner.job_id)
    assert (job.step, job.progress) == (300, 1.0)
    _end(store, owner.job_id)
    switch.engine.dispose()


def test_a_batch_whose_commit_went_unheard_is_not_stored_twice(store: JobStore) -> None:
    owner, clock = _claimed(store), Clock()
    factory = cast(sessionmaker[Session], UnheardCommits(store.factory, count=2))
    reporter = JobReporter(owner=owner, session_factory=factory, flush_interval_s=0.0, clock=clock)
    reporter.on_stage("training", {"steps": 3})  # batch 1 lands; the worker hears an error
    assert reporter.last_error is not None
    for step in (1, 2, 3):
        clock.now += 20.0  # past the backoff
        reporter.on_step(step, 3, {"loss": 0.5})  # step 1: batch 1 again, found stored; then step 1's batch, unheard
    assert reporter.close(wait_s=5.0)
    assert [step for step, _ in store.metric_series(owner.job_id)["loss"]] == [1, 2, 3]
    stage_events = [kind for kind, _, _ in store.events(owner.job_id) if kind == "stage"]
    assert stage_events == ["stage"]
    assert store.job(owner.job_id).report_seq == reporter._batches
    _end(store, owner.job_id)


def test_an_outcome_whose_commit_went_unheard_counts_as_recorded(store: JobStore, tmp_path: Path) -> None:
    owner = _claimed(store)
    reporter = JobReporter(owner=owner, session_factory=store.factory, flush_interval_s=0.0)
    recorder = tasks._Recorder(
        owner=owner,
        reporter=reporter,
        session_factory=cast(sessionmaker[Session], UnheardCommits(store.factory, count=1)),
        wait_s=10.0,
        storage=tasks.StorageAccount(tmp_path, store.job(owner.job_id).tenant_id, None),
    )
    assert recorder.finish(JobStatus.succeeded, message="done", result={"steps": 3}) == "succeeded"
    statuses = [message for kind, message, _ in store.events(owner.job_id) if kind == "status"]
    assert statuses[-1] == "done" and statuses.count("done") == 1
    assert store.job(owner.job_id).result == {"steps": 3}


def test_the_outbox_keeps_order_across_memory_and_spool_and_retakes_an_unconfirmed_batch(tmp_path: Path) -> None:
    outbox = Outbox(memory_limit=3, spool_dir=tmp_path)
    assert outbox.take(10) == [] and len(outbox) == 0
    outbox.add(["metric", 1, "loss", 0.5])  # an empty take must not hold later reports back
    assert outbox.take(10) == [["metric", 1, "loss", 0.5]]
    for step in range(2, 12):  # spills while the first batch is in flight
        outbox.add(["metric", step, "loss", 1.0 / step])
    assert outbox.spilled > 0 and len(outbox) == 11
    assert outbox.take(4) == [["metric", 1, "loss", 0.5]]  # the same batch until confirmed
    outbox.delivered()
    order: list[Any] = []
    while batch := outbox.take(4):
        assert outbox.take(4) == batch
        order += [report[1] for report in batch]
        outbox.delivered()
        if len(order) == 4:
            outbox.add(["event", "stage", "late", None])  # newer than everything still spooled
    assert order == [*range(2, 12), "stage"] and len(outbox) == 0
    outbox.close()
