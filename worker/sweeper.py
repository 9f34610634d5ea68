"""The sweeper: finds runs whose worker died and queued jobs whose message was lost, and sets both going again.

Messages are acked early (see :mod:`jobstore.broker`), so a job whose worker dies is not redelivered by the
broker; heartbeats in the job store are what tell a live run from a dead one:

* a ``running`` / ``cancelling`` job silent for ``heartbeat_timeout_s`` is recovered with
  :func:`jobstore.repository.recover_stale_job`: re-queued and sent again (it resumes from its newest checkpoint,
  since the run folder persists and ``run.resume`` is on), failed with ``system_error`` after ``max_attempts``,
  or ``cancelled`` if it was being cancelled;
* a run is not judged by a silence the job store itself caused: after this process failed to reach the store,
  runs count as stale only ``heartbeat_timeout_s`` after it came back (:class:`StoreWatch`), so a run that
  finished during a database outage and waits to record its outcome is not re-queued and redone;
* a ``queued`` job nobody claimed for two sweep intervals is sent again, unless its queue still holds messages
  (then its message is most likely among them, waiting for a free worker). Claiming is a conditional update, so
  a duplicate message is a no-op;
* every other run kind goes the same way: a merged export silent for ``heartbeat_timeout_s`` is re-queued (the
  merge starts over) or failed with its reason after ``max_attempts`` runs
  (:func:`jobstore.exports.recover_stale_export`), and a queued export nobody claimed is sent again. Each kind
  is one :class:`RunKind` in :data:`RUN_KINDS`, walked by the same loop; what a silent run is (no heartbeat, else
  no start, since the cutoff) and which rows are locked are :mod:`jobstore.runs`'s, shared by every kind.

Where it runs: a daemon thread in every worker process (:class:`SweeperThread`), not Celery beat. That needs no
extra process in the embedded single-machine mode, and it keeps sweeping while the worker's only pool slot is
busy training. Several workers sweeping at once is safe: each recovery locks the job's row (``FOR UPDATE SKIP
LOCKED``), checks again that it is still stale, and goes through the job state machine, so one dead run is
recovered exactly once. The ``dama.sweep`` task runs the same function for deployments that prefer beat.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy.orm import Session, sessionmaker

from jobstore import exports, loops, repository
from jobstore.broker import enqueue_export, enqueue_job
from jobstore.db import session_scope
from jobstore.models import utcnow
from jobstore.settings import Settings
from jobstore.states import JobStatus
from worker.periodic import PeriodicThread

log = logging.getLogger(__name__)


class StoreWatch:
    """When this process last got the job store back after failing to reach it.

    While the job store is down no heartbeat can land, so every run looks silent once it is back, finished runs
    waiting to record their outcome included. Silence is evidence of a dead worker only for time the store could
    have recorded a heartbeat: runs are judged stale only ``heartbeat_timeout_s`` after the store came back."""

    def __init__(self) -> None:
        self.back_since: datetime | None = None  # None: no outage seen, or long enough ago
        self._down = False

    def failed(self) -> None:
        self._down = True

    def reached(self, now: datetime) -> None:
        if self._down:
            self.back_since, self._down = now, False
            log.warning("sweeper: the job store answers again; no run is judged stale before a heartbeat could land")

    def grace(self, silent_since: datetime) -> bool:
        """Whether a run silent since ``silent_since`` may owe its silence to the outage."""
        return self.back_since is not None and self.back_since > silent_since


@dataclass(frozen=True)
class RunKind:
    """One kind of run the sweeper recovers, as the job store and the broker name its parts."""

    name: str  # "job", "export": in the log, and (but for jobs) in the counts ("export_requeued")
    stale: Callable[..., list[str]]  # (session, *, older_than) -> ids of held runs gone silent
    recover: Callable[[Session, str, datetime, int], tuple[str, str] | None]  # -> (new status, queue), or None
    send: Callable[[Celery, str, str], None]  # (app, run id, queue): enqueue it

    def count(self, status: str) -> str:
        outcome = {JobStatus.queued.value: "requeued"}.get(status, status)
        return outcome if self.name == "job" else f"{self.name}_{outcome}"


def _recover_job(session: Session, job_id: str, silent_since: datetime, max_attempts: int) -> tuple[str, str] | None:
    job = repository.lock_stale_job(session, job_id=job_id, older_than=silent_since)
    if job is None:
        return None  # it heartbeat meanwhile, or another sweeper has it
    log.warning("job %s: worker %s silent since %s", job_id, job.worker, job.heartbeat_at)
    status = repository.recover_stale_job(session, job=job, max_attempts=max_attempts)
    loops.status_changed(session, run=job)  # failed or cancelled: a loop it belongs to ends with it
    return status, job.queue


def _recover_export(
    session: Session, export_id: str, silent_since: datetime, max_attempts: int
) -> tuple[str, str] | None:
    export = exports.lock_stale_export(session, export_id=export_id, older_than=silent_since)
    if export is None:
        return None
    log.warning("export %s: worker %s silent since %s", export_id, export.worker, export.heartbeat_at)
    status = exports.recover_stale_export(session, export=export, max_attempts=max_attempts)
    return status, exports.export_queue(session, export=export)


RUN_KINDS = {
    "job": RunKind(
        "job",
        repository.stale_jobs,
        _recover_job,
        lambda app, job_id, queue: enqueue_job(app, job_id=job_id, queue=queue),
    ),
    "export": RunKind(
        "export",
        exports.stale_exports,
        _recover_export,
        lambda app, export_id, queue: enqueue_export(app, export_id=export_id, queue=queue),
    ),
}


def sweep(
    session_factory: sessionmaker[Session], celery_app: Celery, settings: Settings, watch: StoreWatch | None = None
) -> Counter[str]:
    """One pass; returns counts of what it did (``requeued``, ``failed``, ``cancelled``, ``resent``; for exports
    ``export_requeued``, ``export_failed``). With ``watch`` (the process's own view of job-store outages), no run
    is re-queued for a silence an outage caused."""
    done: Counter[str] = Counter()
    now = utcnow()
    silent_since = now - timedelta(seconds=settings.heartbeat_timeout_s)
    try:
        with session_scope(session_factory) as session:
            stale = [
                (kind, run_id) for kind in RUN_KINDS.values() for run_id in kind.stale(session, older_than=silent_since)
            ]
    except Exception:
        if watch is not None:
            watch.failed()
        raise
    if watch is not None:
        watch.reached(now)
        if stale and watch.grace(silent_since):
            log.info("sweeper: %d silent runs left alone: the job store came back at %s", len(stale), watch.back_since)
            stale = []
    for kind, run_id in stale:
        try:
            with session_scope(session_factory) as session:
                recovered = kind.recover(session, run_id, silent_since, settings.max_attempts)
            if recovered is None:
                continue
            status, queue = recovered
            done[kind.count(status)] += 1
            # Sent after the commit, so the worker that takes the message finds the run queued.
            if status == JobStatus.queued.value:
                kind.send(celery_app, run_id, queue)
        except Exception:
            log.exception("sweeper: could not recover %s %s", kind.name, run_id)

    unclaimed_since = now - timedelta(seconds=2 * settings.sweep_interval_s)
    with session_scope(session_factory) as session:
        orphans = [
            ("job", job.id, job.queue) for job in repository.orphaned_queued_jobs(session, older_than=unclaimed_since)
        ]
        orphans += [
            ("export", export.id, exports.export_queue(session, export=export))
            for export in exports.orphaned_queued_exports(session, older_than=unclaimed_since)
        ]
    waiting: dict[str, int | None] = {}
    for name, run_id, queue in orphans:
        if queue not in waiting:
            waiting[queue] = queued_messages(celery_app, queue)
        if waiting[queue]:
            continue
        try:
            RUN_KINDS[name].send(celery_app, run_id, queue)
            log.info("sweeper: %s %s was queued but never claimed; sent it again", name, run_id)
            done["resent"] += 1
        except Exception:
            log.exception("sweeper: could not send %s %s again", name, run_id)
    return done


def queued_messages(celery_app: Celery, queue: str) -> int | None:
    """How many messages wait in ``queue`` (0 when it does not exist), or None if the broker cannot say."""
    try:
        with celery_app.connection_for_write() as connection:
            _name, count, _consumers = connection.default_channel.queue_declare(queue=queue, passive=True)
            return int(count)
    except ChannelError:
        return 0  # the Redis transport reports an empty queue as a missing one
    except Exception:
        log.warning("sweeper: could not count the messages in queue %s", queue, exc_info=True)
        return None


class SweeperThread(PeriodicThread):
    """Runs :func:`sweep` now and then every ``settings.sweep_interval_s`` in a daemon thread until stopped."""

    label = "sweeper"

    def __init__(self, session_factory: sessionmaker[Session], celery_app: Celery, settings: Settings) -> None:
        self.session_factory = session_factory
        self.celery_app = celery_app
        self.settings = settings
        self.interval_s = settings.sweep_interval_s
        self.watch = StoreWatch()
        super().__init__()

    def run_pass(self) -> bool:
        done = sweep(self.session_factory, self.celery_app, self.settings, self.watch)
        if done:
            log.info("sweeper: %s", dict(done))
        return False
