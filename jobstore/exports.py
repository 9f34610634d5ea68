"""Merged exports in the job store: create, list, claim (by exactly one worker), heartbeat, recover and record
the outcome.

An export's life goes through the one state table (:mod:`jobstore.states`), as a job's does: ``queued`` (POST
/jobs/{id}/exports) -> ``running`` (a worker claimed it with a conditional update, so a redelivered message is
harmless; it heartbeats while it merges) -> ``succeeded`` (archive path, size and sha256 recorded) or ``failed``
(a message). A running export whose worker went silent is re-queued by the sweeper, and failed after
``max_attempts`` runs (:func:`recover_stale_export`). A failed export may be asked for again; a queued, running
or succeeded one is reused.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from jobstore.models import Export, Job, utcnow
from jobstore.runs import RunTable, gave_up_reason
from jobstore.states import JobStatus, check_transition

FORMATS = ("merged",)
QUEUED, RUNNING, SUCCEEDED, FAILED = (
    JobStatus.queued.value,
    JobStatus.running.value,
    JobStatus.succeeded.value,
    JobStatus.failed.value,
)
EXPORT_RUNS = RunTable(Export, (RUNNING,))


def create_export(session: Session, *, tenant_id: str, job_id: str, format: str, queue: str | None = None) -> Export:
    export = Export(tenant_id=tenant_id, job_id=job_id, format=format, status=QUEUED, queue=queue, updated_at=utcnow())
    session.add(export)
    session.flush()
    return export


def reusable_export(session: Session, *, job_id: str, format: str) -> Export | None:
    """The job's newest export of ``format`` that has not failed: asking again returns it instead of merging twice."""
    return session.scalar(
        select(Export)
        .where(Export.job_id == job_id, Export.format == format, Export.status != FAILED)
        .order_by(Export.id.desc())
    )


def get_export(session: Session, *, export_id: str, job_id: str | None = None) -> Export | None:
    export = session.get(Export, export_id)
    if export is None or (job_id is not None and export.job_id != job_id):
        return None
    return export


def list_exports(session: Session, *, job_id: str) -> list[Export]:
    return list(session.scalars(select(Export).where(Export.job_id == job_id).order_by(Export.id)))


def succeeded_merged_exports(session: Session, *, tenant_id: str) -> list[tuple[Export, Job]]:
    """The tenant's succeeded merged exports of its own jobs, newest first, each with its job (what it can chat
    with)."""
    query = (
        select(Export, Job)
        .join(Job, Export.job_id == Job.id)
        .where(
            Export.tenant_id == tenant_id,
            Job.tenant_id == tenant_id,
            Export.status == SUCCEEDED,
            Export.format == "merged",
        )
        .order_by(Export.id.desc())
    )
    return [(export, job) for export, job in session.execute(query).tuples()]


def _set_status(export: Export, status: str) -> None:
    """Move ``export`` to ``status`` through the state table (raises IllegalTransition)."""
    export.status = check_transition(export.status, status).value
    export.updated_at = utcnow()


def claim_export(session: Session, *, export_id: str, worker: str) -> Export | None:
    """Take a queued export for this worker (one more attempt, heartbeat now); None when another worker has it
    (or it is gone). queued -> running is a legal transition of the state table."""
    check_transition(QUEUED, RUNNING)
    now = utcnow()
    claimed = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status == QUEUED)
        .values(status=RUNNING, worker=worker, attempts=Export.attempts + 1, heartbeat_at=now)
        .values(started_at=func.coalesce(Export.started_at, now), updated_at=now)  # the first run's start
        .execution_options(synchronize_session=False)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        return None
    return session.get(Export, export_id, populate_existing=True)


def heartbeat_export(session: Session, *, export_id: str, worker: str, attempt: int) -> bool:
    """A sign of life from the worker running ``attempt``; False once the export is no longer its own (re-queued
    after a silence and taken by another worker, or gone)."""
    beat = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status == RUNNING, Export.worker == worker, Export.attempts == attempt)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return getattr(beat, "rowcount", 0) == 1


def lock_owned_export(session: Session, *, export_id: str, worker: str, attempt: int) -> Export | None:
    """The export, locked for its final write, if ``worker`` still runs it in ``attempt``; else None (the sweeper
    gave it to another run meanwhile, which records the outcome)."""
    return EXPORT_RUNS.lock_owned(session, run_id=export_id, worker=worker, attempt=attempt)


def finish_export(
    session: Session,
    *,
    export: Export,
    path: str | None = None,
    size_bytes: int | None = None,
    sha256: str | None = None,
    error_message: str | None = None,
) -> Export:
    """Record the outcome: the archive (succeeded) or ``error_message`` (failed)."""
    _set_status(export, FAILED if error_message is not None else SUCCEEDED)
    export.path, export.size_bytes, export.sha256 = path, size_bytes, sha256
    export.error_message = error_message
    export.finished_at = utcnow()
    session.flush()
    return export


# ---- the sweeper ---------------------------------------------------------------------------------------------


def stale_exports(session: Session, *, older_than: datetime) -> list[str]:
    """Ids of running exports whose worker has shown no sign of life since ``older_than``."""
    return EXPORT_RUNS.stale_ids(session, older_than=older_than)


def lock_stale_export(session: Session, *, export_id: str, older_than: datetime) -> Export | None:
    """Lock an export that is still stale for recovery; None when it is not, or another sweeper holds it
    (:meth:`jobstore.runs.RunTable.lock_stale`)."""
    return EXPORT_RUNS.lock_stale(session, run_id=export_id, older_than=older_than)


def recover_stale_export(session: Session, *, export: Export, max_attempts: int) -> str:
    """An export whose worker died: re-queue it (the merge starts over), or fail it with the reason once it has
    had ``max_attempts`` runs. Returns the new status."""
    if (reason := gave_up_reason(export.attempts, max_attempts=max_attempts)) is not None:
        finish_export(session, export=export, error_message=reason)
    else:
        _set_status(export, QUEUED)
        export.worker, export.heartbeat_at = None, None
        session.flush()
    return export.status


def orphaned_queued_exports(session: Session, *, older_than: datetime) -> list[Export]:
    """Queued exports whose status has not changed since ``older_than`` (their message may have been lost)."""
    unchanged = or_(Export.updated_at.is_(None), Export.updated_at < older_than)
    return list(session.scalars(select(Export).where(Export.status == QUEUED, unchanged)))


def job_of(session: Session, *, export: Export) -> Job:
    """The training job whose adapter the export merges."""
    job = session.get(Job, export.job_id)
    assert job is not None  # the export row goes with its job (ON DELETE CASCADE)
    return job


def export_queue(session: Session, *, export: Export) -> str:
    """The queue an export is sent to: its own, else (rows made before it was recorded) its job's."""
    return export.queue if export.queue is not None else job_of(session, export=export).queue
