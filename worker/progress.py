"""How a running job reports to the job store: the engine callback and the heartbeat thread.

:class:`JobReporter` is the engine's :class:`~dama_engine.callbacks.Callback` for one run. It buffers each step's
metrics in memory and writes them, the progress (step, total, fraction, ETA) and a heartbeat at most every
``metrics_flush_s`` (and at every stage change, checkpoint and the end), so a fast training loop is not slowed by
database round trips. It polls the job's status at most every ``poll_interval_s`` and asks the engine to stop when
the job is ``cancelling``, when this worker no longer owns the run (the sweeper gave it to another worker), or
when the worker is shutting down. No database error escapes it: a failed write is logged and retried at the next
flush, so a flaky job store never kills a training run (the heartbeat going silent is what the sweeper watches).

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
from typing import Any, Literal

from sqlalchemy.orm import Session, sessionmaker

from dama_engine.callbacks import Callback
from jobstore import repository
from jobstore.db import session_scope
from jobstore.states import JobStatus

log = logging.getLogger(__name__)

StopReason = Literal["cancelled", "lost", "shutdown"]
ACTIVE = (JobStatus.running.value, JobStatus.cancelling.value)
MAX_BUFFERED_POINTS = 500_000  # while the job store is unreachable; older points are dropped beyond this


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
    ) -> None:
        self.owner = owner
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
        self._points: list[tuple[int, str, float]] = []
        self._events: list[tuple[str, str, dict[str, Any] | None]] = []
        self._stage_changed = False
        self._last_flush = -math.inf
        self._last_poll = -math.inf
        self._rate_origin: tuple[float, int] | None = None  # (time, step) when training (re)started
        self._last_activity = clock()

    def idle_s(self) -> float:
        """Seconds since the engine last reported anything (a stage, progress, a step, an evaluation, a checkpoint,
        output of torchrun's ranks); stop polls do not count, since a launcher polls them while its ranks may hang."""
        return self.clock() - self._last_activity

    def on_activity(self) -> None:
        self._last_activity = self.clock()

    # ---- the engine's callback ----------------------------------------------------------------------------

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.on_activity()
        self.stage = stage
        self._stage_changed = True
        details = ", ".join(f"{key} {value}" for key, value in info.items())
        message = f"stage {stage}" + (f" ({details})" if details else "")
        self._events.append(("stage", message, {"stage": stage, **json_safe(info)}))
        if stage == "training":
            self.total_steps = int(info["steps"])
            self.resumed_from_step = int(info.get("resumed_from_step") or 0)
            self.step = self.resumed_from_step
            self._rate_origin = (self.clock(), self.step)
            if self.resumed_from_step:
                self._events.append(
                    (
                        "resumed",
                        f"resumed from the checkpoint at step {self.resumed_from_step} (attempt {self.owner.attempt})",
                        {"step": self.resumed_from_step, "attempt": self.owner.attempt},
                    )
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
        self._events.append(("evaluation", f"held-out evaluation at step {step}{summary}", json_safe(metrics)))
        self.flush()

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.on_activity()
        # Metrics first: after a crash the run resumes here, and the rows up to this step must already exist.
        self.flush()

        def register(session: Session) -> None:
            repository.add_checkpoint(session, job_id=self.owner.job_id, step=step, path=str(path))
            # The engine keeps only the newest checkpoints on disk: the list must not offer pruned ones.
            known = repository.list_checkpoints(session, job_id=self.owner.job_id)
            pruned = [row.path for row in known if row.path != str(path) and not Path(row.path).exists()]
            repository.forget_checkpoints(session, job_id=self.owner.job_id, paths=pruned)
            repository.add_events(
                session,
                job_id=self.owner.job_id,
                events=[("checkpoint", f"checkpoint saved at step {step}", {"step": step, "path": str(path)})],
            )

        self._write(register)

    def should_stop(self) -> bool:
        self._poll()
        return self.stop_reason is not None

    # ---- writing and polling ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write buffered metrics and events, the progress and a heartbeat, in one transaction."""
        points, events = self._points, self._events
        progress, eta = self._progress()

        def write(session: Session) -> None:
            if not self._owns(session):
                return
            repository.add_metrics(session, job_id=self.owner.job_id, points=points)
            repository.add_events(session, job_id=self.owner.job_id, events=events)
            status = repository.record_progress(
                session,
                job_id=self.owner.job_id,
                stage=self.stage if self._stage_changed else None,
                step=self.step,
                total_steps=self.total_steps,
                progress=progress,
                eta_seconds=eta,
            )
            self._note_status(status)

        self._last_flush = self.clock()
        if self._write(write):
            self._points, self._events = [], []
            self._stage_changed = False
            self._last_poll = self._last_flush
        elif len(self._points) > MAX_BUFFERED_POINTS:
            log.warning("job %s: dropping %d buffered metric points", self.owner.job_id, len(points) // 2)
            del self._points[: len(points) // 2]

    def close(self) -> None:
        self.flush()

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

    def _buffer(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._points.append((step, key, float(value)))

    def _poll(self) -> None:
        if self.shutdown.is_set() and self.stop_reason is None:
            self.stop_reason = "shutdown"
        now = self.clock()
        if now - self._last_poll < self.poll_interval_s:
            return
        self._last_poll = now
        self._write(self._owns)

    def _raise_if_stopping(self) -> None:
        if self.should_stop():
            assert self.stop_reason is not None
            raise JobStopped(self.stop_reason)

    def _owns(self, session: Session) -> bool:
        """Whether this attempt still runs the job; notes a cancel request or a lost run as the stop reason."""
        row = repository.job_owner(session, job_id=self.owner.job_id)
        if row is None or row[0] not in ACTIVE or row[1] != self.owner.worker or row[2] != self.owner.attempt:
            if self.stop_reason != "lost":
                log.warning("job %s: this worker no longer owns attempt %d; stopping", *self._ids())
            self.stop_reason = "lost"
            return False
        self._note_status(row[0])
        return True

    def _note_status(self, status: str | None) -> None:
        if status == JobStatus.cancelling.value and self.stop_reason in (None, "shutdown"):
            self.stop_reason = "cancelled"

    def _ids(self) -> tuple[str, int]:
        return self.owner.job_id, self.owner.attempt

    def _write(self, action: Callable[[Session], Any]) -> bool:
        try:
            with session_scope(self.session_factory) as session:
                action(session)
            return True
        except Exception:
            log.warning("job %s: could not write to the job store; will retry", self.owner.job_id, exc_info=True)
            return False


class EvaluationReporter(JobReporter):
    """The callback of an evaluation run (``dama_engine.evaluation.run_evaluation``): stage events as for training,
    and progress as the share of its model passes done (each ``log_probs`` / ``generating`` stage is one pass of
    one model; ``passes`` is how many the run makes), with an ETA from the rate so far."""

    PASS_STAGES = ("log_probs", "generating")

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
            except Exception:
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

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
