"""How a running job reports to the job store: the engine callback and the heartbeat thread.

:class:`JobReporter` is the engine's :class:`~dama_engine.callbacks.Callback` for one run. It queues each step's
metrics, the events and the checkpoint registrations in an :class:`~worker.outbox.Outbox` and delivers them, the
progress (step, total, fraction, ETA) and a heartbeat at most every ``metrics_flush_s`` (and at every stage
change, checkpoint and the end), so a fast training loop is not slowed by database round trips. It polls the
job's status at most every ``poll_interval_s`` and asks the engine to stop when the job is ``cancelling``, when
this worker no longer owns the run (the sweeper gave it to another worker), or when the worker is shutting down.

No database error escapes it, and nothing reported is lost to an outage: undelivered reports stay in the outbox
(spilled to disk past a bound), writes are retried with backoff, and the backlog goes out in order, in batches,
once the job store answers again. Each batch carries a number that commits with its rows (``jobs.report_seq``),
so a batch whose commit outcome was never heard is not stored twice. At the end of the run :meth:`JobReporter.close`
waits for an unreachable job store (``DAMA_STORE_WAIT_S``) before the outcome is recorded.

:class:`Heartbeat` keeps ``heartbeat_at`` fresh during long work without steps (model loading, the reference
pass, evaluation) from a background thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dama_engine.callbacks import Callback
from jobstore import repository
from jobstore.artifacts import ArtifactStore
from jobstore.db import session_scope
from jobstore.states import JobStatus
from worker.outbox import MEMORY_LIMIT, Outbox, Report

log = logging.getLogger(__name__)

T = TypeVar("T")

StopReason = Literal["cancelled", "lost", "shutdown"]
ACTIVE = (JobStatus.running.value, JobStatus.cancelling.value)
BATCH_REPORTS = 2_000  # reports per delivery transaction (a backlog after an outage goes in several)
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0  # backoff between attempts to reach an unreachable job store


@dataclass(frozen=True)
class RunOwner:
    """One attempt of one job on one worker: the only one allowed to write the job's progress and outcome."""

    job_id: str
    worker: str
    attempt: int


class JobStopped(Exception):
    """Raised from a callback outside the training loop (no step boundary to stop at) to end the run early."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(f"run stopped: {reason}")
        self.reason = reason


def deep_json_safe(value: Any) -> Any:
    """``value`` (nested dicts / lists) with non-finite floats as None and other non-JSON leaves as strings."""
    if isinstance(value, dict):
        return {str(key): deep_json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [deep_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """Floats that JSON (and Postgres JSONB) cannot hold become None, nested dicts and lists included; other
    non-JSON values become strings."""
    return {str(key): _json_value(value) for key, value in values.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return json_safe(value)
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    return str(value)


class JobReporter(Callback):
    def __init__(
        self,
        *,
        owner: RunOwner,
        session_factory: sessionmaker[Session],
        flush_interval_s: float,
        poll_interval_s: float = 0.5,
        shutdown: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        spool_dir: Path | None = None,
        memory_limit: int = MEMORY_LIMIT,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.owner = owner
        # Where checkpoints are kept: a remote store gets each one as it is written; None: the local folder.
        self.artifacts = artifacts
        self.session_factory = session_factory
        self.flush_interval_s = flush_interval_s
        self.poll_interval_s = poll_interval_s
        self.shutdown = shutdown or threading.Event()
        self.clock = clock
        self.stage: str | None = None
        self.step = 0
        self.total_steps: int | None = None
        self.resumed_from_step = 0
        self.stop_reason: StopReason | None = None
        self.outbox = Outbox(memory_limit=memory_limit, spool_dir=spool_dir)
        self.last_error: BaseException | None = None  # of the last failed write; None after a good one
        self._batches = 0  # report batches this attempt has delivered (jobs.report_seq)
        self._backoff = Backoff()
        self._retry_at = -math.inf  # no write before this (clock) time: the job store failed just now
        self._closed = False
        self._last_flush = -math.inf
        self._last_poll = -math.inf
        self._rate_origin: tuple[float, int] | None = None  # (time, step) when training (re)started
        self._last_activity = clock()

    def idle_s(self) -> float:
        """Seconds since the engine last reported anything (a stage, progress, a step, an evaluation, a checkpoint,
        output of torchrun's ranks); stop polls do not count, since a launcher polls them while its ranks may hang.
        Zero once the run is closed: waiting for the job store to come back is not a hung run."""
        return 0.0 if self._closed else self.clock() - self._last_activity

    def on_activity(self) -> None:
        self._last_activity = self.clock()

    # ---- the engine's callback ----------------------------------------------------------------------------

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.on_activity()
        self.stage = stage
        details = ", ".join(f"{key} {value}" for key, value in info.items())
        message = f"stage {stage}" + (f" ({details})" if details else "")
        self._event("stage", message, {"stage": stage, **json_safe(info)})
        if stage == "training":
            self.total_steps = int(info["steps"])
            self.resumed_from_step = int(info.get("resumed_from_step") or 0)
            self.step = self.resumed_from_step
            self._rate_origin = (self.clock(), self.step)
            if self.resumed_from_step:
                self._event(
                    "resumed",
                    f"resumed from the checkpoint at step {self.resumed_from_step} (attempt {self.owner.attempt})",
                    {"step": self.resumed_from_step, "attempt": self.owner.attempt},
                )
        self.flush()
        if stage != "training":
            self._raise_if_stopping()

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.on_activity()
        self._raise_if_stopping()

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.on_activity()
        self.step, self.total_steps = step, total_steps
        self._buffer(step, metrics)
        if self.clock() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.on_activity()
        self._buffer(step, metrics)
        accuracy, margin = metrics.get("eval_accuracy"), metrics.get("eval_margin")
        summary = ""
        if accuracy is not None and margin is not None:
            summary = f": accuracy {accuracy:.3f}, margin {margin:.4f}"
        self._event("evaluation", f"held-out evaluation at step {step}{summary}", json_safe(metrics))
        self.flush()

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.on_activity()
        name = str(path)
        if self.artifacts is not None:
            # Before it is registered: a job resumes on another machine only from a checkpoint in the store. A
            # failed upload costs only that: the run goes on, and the next checkpoint tries again.
            try:
                self.artifacts.publish_checkpoint(path)
            except Exception:
                log.exception("job %s: checkpoint at step %d could not be stored", self.owner.job_id, step)
            self.on_activity()
            name = self.artifacts.recorded_path(path)  # the name every machine knows it by (s3://...)
        # Registered after the metrics before it (the outbox keeps order, a batch commits whole): after a crash
        # the run resumes here, and the rows up to this step must already exist.
        self.outbox.add(["checkpoint", step, name])
        self._event("checkpoint", f"checkpoint saved at step {step}", {"step": step, "path": name})
        self.flush()

    def should_stop(self) -> bool:
        self._poll()
        return self.stop_reason is not None

    # ---- writing and polling ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Deliver the pending reports, the progress and a heartbeat. After a failed write, nothing is tried until
        a backoff delay has passed (a down database must not cost every training step a connection attempt);
        the reports stay pending meanwhile."""
        self._last_flush = self.clock()
        if self._last_flush >= self._retry_at:
            self._attempt(self._deliver_pending)

    def close(self, *, wait_s: float = 0.0) -> bool:
        """The run's last delivery. While the job store is unreachable, retry with backoff for up to ``wait_s``
        seconds. True when nothing is left to deliver (or the run lost the job: none of it is wanted then)."""
        self._closed = True
        deadline = time.monotonic() + wait_s
        backoff = Backoff()
        while True:
            self._retry_at = -math.inf
            self.flush()
            if self.stop_reason == "lost" or (self.last_error is None and not self.outbox):
                self.outbox.close()
                return True
            delay = backoff.next()
            if not store_unreachable(self.last_error) or time.monotonic() + delay > deadline:
                log.error(
                    "job %s: %d reports could not be delivered to the job store; giving up on them (%r)",
                    self.owner.job_id,
                    len(self.outbox),
                    self.last_error,
                )
                self.outbox.close()
                return False
            log.info("job %s: job store unreachable; %d reports wait, retry in %.1f s", *self._ids(), delay)
            time.sleep(delay)

    def _deliver_pending(self, session: Session) -> None:
        """One transaction per batch of reports, in order, until none is left; the last one also writes progress."""
        while True:
            batch = self.outbox.take(BATCH_REPORTS)
            status = self._deliver(session, batch)
            if status is None:
                return
            if not batch:
                self._write_progress(session)
                return
            session.commit()
            self._batches += 1
            self.outbox.delivered()
            if not self.outbox:
                self._write_progress(session)
                return

    def _deliver(self, session: Session, batch: list[Report]) -> str | None:
        """Write one batch as delivery number ``_batches + 1``, once: a batch whose earlier commit landed unheard
        is skipped. Returns the job's status, or None when this attempt no longer runs the job."""
        if not batch:
            return self._owns(session)
        number = self._batches + 1
        job_id, worker, attempt = self.owner.job_id, self.owner.worker, self.owner.attempt
        status = repository.take_report_batch(session, job_id=job_id, worker=worker, attempt=attempt, batch=number)
        if status is None:
            delivered = repository.delivered_report_batches(session, job_id=job_id, worker=worker, attempt=attempt)
            if delivered is None:
                self._owns(session)  # notes the lost run
                return None
            if delivered < number:
                raise RuntimeError(f"report batch {number} out of order: the job store holds {delivered}")
            log.info("job %s: report batch %d was already stored (its commit went unheard)", self.owner.job_id, number)
            return JobStatus.running.value
        self._note_status(status)
        stored = self.artifacts.checkpoint_stored if self.artifacts is not None else _on_disk
        write_reports(session, job_id=self.owner.job_id, reports=batch, stored=stored)
        return status

    def _write_progress(self, session: Session) -> None:
        progress, eta = self._progress()
        status = repository.record_progress(
            session,
            job_id=self.owner.job_id,
            stage=self.stage,
            step=self.step,
            total_steps=self.total_steps,
            progress=progress,
            eta_seconds=eta,
            worker=self.owner.worker,
            attempt=self.owner.attempt,
        )
        self._note_status(status)
        self._last_poll = self.clock()

    def _progress(self) -> tuple[float | None, float | None]:
        if not self.total_steps:
            return None, None
        progress = min(1.0, self.step / self.total_steps)
        eta = None
        if self._rate_origin is not None:
            started, first_step = self._rate_origin
            elapsed, done = self.clock() - started, self.step - first_step
            if done > 0 and elapsed > 0:
                eta = max(0.0, (self.total_steps - self.step) * elapsed / done)
        return progress, eta

    def note(self, message: str, data: dict[str, Any]) -> None:
        """A ``tracking`` event: what an experiment tracker could not do (never a job failure)."""
        self._event("tracking", message, data)

    def _event(self, kind: str, message: str, data: dict[str, Any] | None) -> None:
        self.outbox.add(["event", kind, message, data])

    def _buffer(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.outbox.add(["metric", step, key, float(value)])

    def _poll(self) -> None:
        if self.shutdown.is_set() and self.stop_reason is None:
            self.stop_reason = "shutdown"
        now = self.clock()
        if now - self._last_poll < self.poll_interval_s or now < self._retry_at:
            return
        self._last_poll = now
        self._attempt(self._owns)

    def _raise_if_stopping(self) -> None:
        if self.should_stop():
            assert self.stop_reason is not None
            raise JobStopped(self.stop_reason)

    def _owns(self, session: Session) -> str | None:
        """The job's status if this attempt still runs the job, else None; notes a cancel request, or a lost run
        (whose pending reports are dropped: the job's new owner reports from its own checkpoint) as the stop
        reason."""
        row = repository.job_owner(session, job_id=self.owner.job_id)
        if row is None or row[0] not in ACTIVE or row[1] != self.owner.worker or row[2] != self.owner.attempt:
            if self.stop_reason != "lost":
                log.warning("job %s: this worker no longer owns attempt %d; stopping", *self._ids())
            self.stop_reason = "lost"
            self.outbox.clear()
            return None
        self._note_status(row[0])
        return row[0]

    def _note_status(self, status: str | None) -> None:
        if status == JobStatus.cancelling.value and self.stop_reason in (None, "shutdown"):
            self.stop_reason = "cancelled"

    def _ids(self) -> tuple[str, int]:
        return self.owner.job_id, self.owner.attempt

    def _attempt(self, action: Callable[[Session], Any]) -> bool:
        """Run ``action`` in a transaction; a failure is logged (fully the first time of an outage) and starts
        the backoff, never raised: a flaky job store must not kill a training run."""
        try:
            with session_scope(self.session_factory) as session:
                action(session)
        except Exception as error:
            delay = self._backoff.next()
            self._retry_at = self.clock() + delay
            first = self.last_error is None
            self.last_error = error
            log.warning(
                "job %s: could not write to the job store (%d reports pending); retrying in %.1f s: %s",
                self.owner.job_id,
                len(self.outbox),
                delay,
                str(error).splitlines()[0] if str(error) else type(error).__name__,
                exc_info=first,
            )
            return False
        if self.last_error is not None:
            log.info("job %s: the job store is reachable again", self.owner.job_id)
        self.last_error = None
        self._backoff.reset()
        self._retry_at = -math.inf
        return True


def _on_disk(path: str) -> bool:
    return Path(path).exists()


def write_reports(
    session: Session, *, job_id: str, reports: list[Report], stored: Callable[[str], bool] = _on_disk
) -> None:
    """Store one batch of reports: its metric points, its events (in order) and its checkpoints (``stored``: whether
    the checkpoint a row names is still kept)."""
    points = [(int(step), str(key), float(value)) for _, step, key, value in _of_kind(reports, "metric")]
    repository.add_metrics(session, job_id=job_id, points=points)
    events = [(str(kind), str(message), data) for _, kind, message, data in _of_kind(reports, "event")]
    repository.add_events(session, job_id=job_id, events=events)
    for _, step, path in _of_kind(reports, "checkpoint"):
        # Delivered late (after an outage), a checkpoint may already be pruned from disk: the list offers only
        # what a resume can use, i.e. what the engine still keeps (its newest few).
        if stored(str(path)):
            repository.add_checkpoint(session, job_id=job_id, step=int(step), path=str(path))
        known = repository.list_checkpoints(session, job_id=job_id)
        pruned = [row.path for row in known if not stored(row.path)]
        repository.forget_checkpoints(session, job_id=job_id, paths=pruned)


def _of_kind(reports: list[Report], kind: str) -> list[Report]:
    return [report for report in reports if report[0] == kind]


@dataclass
class Backoff:
    """Delays between attempts to reach the job store: doubling from ``first_s`` up to ``max_s``."""

    first_s: float = RETRY_FIRST_S
    max_s: float = RETRY_MAX_S
    _last: float = 0.0

    def next(self) -> float:
        self._last = min(self.max_s, max(self.first_s, 2 * self._last))
        return self._last

    def reset(self) -> None:
        self._last = 0.0


def store_unreachable(error: BaseException | None) -> bool:
    """Whether ``error`` says the job store could not be reached (temporary: worth waiting for), rather than that
    a statement was wrong."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


def write_until(deadline: float, write: Callable[[], T], *, what: str) -> T | None:
    """A run's final write (its outcome): ``write`` (one transaction) again after each :class:`Backoff` delay
    while the job store is unreachable, until ``deadline`` (``time.monotonic()``). None when it could not be made
    (an error that is no outage, or the deadline passed): the run then stays held with a silent heartbeat and the
    sweeper recovers it. ``what`` names the write in the log ("job job_1: its outcome (succeeded)")."""
    backoff = Backoff()
    while True:
        try:
            return write()
        except Exception as error:
            delay = backoff.next()
            if not store_unreachable(error) or time.monotonic() + delay > deadline:
                log.exception("%s could not be recorded", what)
                return None
            log.warning("%s: job store unreachable; recording it again in %.1f s", what, delay)
            time.sleep(delay)


class EvaluationReporter(JobReporter):
    """The callback of an evaluation run (``dama_engine.evaluation.run_evaluation``): stage events as for training,
    and progress as the share of its model passes done (each ``log_probs`` / ``generating`` stage is one pass of
    one model; ``passes`` is how many the run makes), with an ETA from the rate so far."""

    PASS_STAGES: tuple[str, ...] = ("log_probs", "generating")

    def __init__(self, *, passes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.passes = max(1, passes)
        self._passes_done = 0
        self._in_pass = False
        self._fraction = 0.0
        self._work_started: float | None = None

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        if self._in_pass:  # any new stage ends the pass before it
            self._passes_done += 1
            self._in_pass = False
        if stage in self.PASS_STAGES:
            self._in_pass = True
            self._fraction = 0.0
            if self._work_started is None:
                self._work_started = self.clock()
        super().on_stage(stage, info)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        if stage in self.PASS_STAGES and total > 0:
            self._fraction = min(1.0, done / total)
            if self.clock() - self._last_flush >= self.flush_interval_s:
                self.flush()
        super().on_progress(stage, done, total)

    def _progress(self) -> tuple[float | None, float | None]:
        done = min(1.0, (self._passes_done + (self._fraction if self._in_pass else 0.0)) / self.passes)
        if self.stage == "writing":
            done = max(done, 0.99)
        eta = None
        if self._work_started is not None and done > 0:
            elapsed = self.clock() - self._work_started
            eta = max(0.0, elapsed * (1.0 - done) / done)
        return done, eta


class PairGenerationReporter(EvaluationReporter):
    """The callback of a pair generation (``dama_engine.pairs.generate_pairs``): one pass, its ``generating``
    stage, whose progress (prompts sampled of the prompts) is also the run's step of total steps; with a judge
    (``listing``), its ``listing_objects`` stage (images listed of the images) is a first pass."""

    def __init__(self, *, listing: bool = False, **kwargs: Any) -> None:
        super().__init__(passes=2 if listing else 1, **kwargs)
        if listing:
            self.PASS_STAGES = (*self.PASS_STAGES, "listing_objects")

    def on_progress(self, stage: str, done: int, total: int) -> None:
        if stage == "generating":
            self.step, self.total_steps = done, total
        super().on_progress(stage, done, total)

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "generating" and "prompts" in info:
            self.total_steps = int(info["prompts"])
        super().on_stage(stage, info)


@dataclass(frozen=True)
class StallWatchdog:
    """When the run counts as hung (``idle_s() > timeout_s``) and what then happens (``on_stall(idle_s)``)."""

    idle_s: Callable[[], float]
    timeout_s: float
    on_stall: Callable[[float], None]


class Heartbeat:
    """Stamps ``heartbeat_at`` every ``interval_s`` from a daemon thread until stopped.

    With a :class:`StallWatchdog`, a run silent for longer than its timeout gets a ``stalled`` event instead of a
    heartbeat, the heartbeats stop (so the sweeper re-queues the job once ``heartbeat_timeout_s`` has passed) and
    ``on_stall`` runs (the worker exits: a hung CUDA call or collective cannot be interrupted from Python).
    """

    def __init__(
        self,
        *,
        owner: RunOwner,
        session_factory: sessionmaker[Session],
        interval_s: float,
        watchdog: StallWatchdog | None = None,
    ) -> None:
        self.owner = owner
        self.job_id = owner.job_id
        self.session_factory = session_factory
        self.interval_s = interval_s
        self.watchdog = watchdog
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{owner.job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        failing = False
        while not self._stopped.wait(self.interval_s):
            watchdog = self.watchdog
            if watchdog is not None and (idle := watchdog.idle_s()) > watchdog.timeout_s:
                self._record_stall(idle, watchdog.timeout_s)
                watchdog.on_stall(idle)
                return
            try:
                with session_scope(self.session_factory) as session:
                    repository.record_progress(
                        session, job_id=self.job_id, worker=self.owner.worker, attempt=self.owner.attempt
                    )
                failing = False
            except Exception as error:
                # The traceback once per outage; the run (or its wait to record its outcome) goes on meanwhile.
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                log.warning("job %s: heartbeat failed: %s", self.job_id, reason, exc_info=not failing)
                failing = True

    def _record_stall(self, idle: float, timeout: float) -> None:
        log.error("job %s: no progress for %.0f s (stall timeout %.0f s): treated as hung", self.job_id, idle, timeout)
        try:
            with session_scope(self.session_factory) as session:
                owned = repository.lock_owned_job(
                    session, job_id=self.job_id, worker=self.owner.worker, attempt=self.owner.attempt
                )
                if owned is None:
                    return
                message = (
                    f"no progress for {idle:.0f} s (DAMA_STALL_TIMEOUT_S {timeout:.0f}): the run is treated as hung; "
                    f"worker {self.owner.worker} stops and the job will be re-queued"
                )
                repository.add_events(
                    session,
                    job_id=self.job_id,
                    events=[("stalled", message, {"idle_s": round(idle, 1), "attempt": self.owner.attempt})],
                )
        except Exception:
            log.warning("job %s: could not record the stall", self.job_id, exc_info=True)
