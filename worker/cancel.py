"""A cancel honoured in every stage within seconds, not only at the training loop's step boundaries.

The engine stops cooperatively where it can: at a step boundary, and at each stage change or progress report
(:class:`worker.progress.JobReporter`). Long work without either (building a built-in model, loading the processor
and the weights, a slow first batch) would otherwise keep a ``cancelling`` job running for minutes. While a run is
*armed*, :class:`CancelWatch` polls the job's status from a thread every ``poll_s``; once the job is
``cancelling`` it marks the reporter stopped (so the cooperative checks stop at once), and if the run is still
going ``grace_s`` later it raises :class:`Interrupted` (a :class:`~worker.progress.JobStopped`) in the run's
thread, again every ``grace_s`` until the run returns. Python delivers such an exception between bytecodes, so
a run blocked inside one long C call sees it when that call returns; files the engine writes are written atomically
(a partial file renamed into place), so an interrupted write leaves nothing half-written behind.

Only the run itself is armed: packing the adapter and recording the outcome are never interrupted.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository
from jobstore.db import session_scope
from jobstore.states import JobStatus
from worker.progress import JobReporter, JobStopped, RunOwner

log = logging.getLogger(__name__)

POLL_S = 1.0
GRACE_S = 4.0


class Interrupted(JobStopped):
    """Raised in the run's thread by :class:`CancelWatch` (an asynchronous exception is made from its class alone,
    with no arguments)."""

    def __init__(self) -> None:
        super().__init__("cancelled")


def _raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Schedule ``exception`` in thread ``thread_id`` (None: withdraw a scheduled one not yet raised)."""
    target = ctypes.py_object(exception) if exception is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


class CancelWatch:
    def __init__(
        self,
        *,
        owner: RunOwner,
        session_factory: sessionmaker[Session],
        reporter: JobReporter,
        poll_s: float = POLL_S,
        grace_s: float = GRACE_S,
    ) -> None:
        self.owner = owner
        self.session_factory = session_factory
        self.reporter = reporter
        self.poll_s = poll_s
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._armed = False
        self._raised = False
        self._stopped = threading.Event()
        self._thread_id = 0

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Watch the job while the block (the run) executes in this thread."""
        self._thread_id = threading.get_ident()
        with self._lock:
            self._armed = True
        watcher = threading.Thread(target=self._watch, name=f"cancel-{self.owner.job_id}", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            with self._lock:
                self._armed = False
                if self._raised:
                    _raise_in(self._thread_id, None)  # the run ended first: nothing left to interrupt
            self._stopped.set()
            watcher.join(timeout=10)

    def _cancel_requested(self) -> bool:
        try:
            with session_scope(self.session_factory) as session:
                row = repository.job_owner(session, job_id=self.owner.job_id)
        except Exception:  # the job store is down: the reporter and the heartbeat deal with that
            log.debug("job %s: could not read its status", self.owner.job_id, exc_info=True)
            return False
        return row is not None and row[0] == JobStatus.cancelling.value

    def _watch(self) -> None:
        seen: float | None = None
        while not self._stopped.wait(self.poll_s):
            if seen is None:
                if not self._cancel_requested():
                    continue
                seen = time.monotonic()
                if self.reporter.stop_reason in (None, "shutdown"):
                    self.reporter.stop_reason = "cancelled"  # the cooperative checks stop at their next call
                log.info("job %s: cancel requested", self.owner.job_id)
            if time.monotonic() - seen < self.grace_s:
                continue
            with self._lock:
                if not self._armed:
                    return
                late = time.monotonic() - seen
                log.warning("job %s: cancelled but still running after %.0f s: interrupting", self.owner.job_id, late)
                _raise_in(self._thread_id, Interrupted)
                self._raised = True
            seen = time.monotonic()  # again after another grace period, if something swallowed it
