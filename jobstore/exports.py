"""Merged exports in the job store: create, list, claim (by exactly one worker) and record the outcome.

An export's life: ``queued`` (POST /jobs/{id}/exports) -> ``running`` (a worker claimed it with a conditional
update, so a redelivered message is harmless) -> ``succeeded`` (archive path, size and sha256 recorded) or
``failed`` (a message). A failed export may be asked for again; a queued, running or succeeded one is reused.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobstore.models import Export, utcnow

FORMATS = ("merged",)
QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"


def create_export(session: Session, *, tenant_id: str, job_id: str, format: str) -> Export:
    export = Export(tenant_id=tenant_id, job_id=job_id, format=format, status=QUEUED)
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


def claim_export(session: Session, *, export_id: str, worker: str) -> Export | None:
    """Take a queued export for this worker; None when another worker has it (or it is gone)."""
    claimed = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status == QUEUED)
        .values(status=RUNNING, worker=worker, started_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        return None
    return session.get(Export, export_id, populate_existing=True)


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
    export.status = FAILED if error_message is not None else SUCCEEDED
    export.path, export.size_bytes, export.sha256 = path, size_bytes, sha256
    export.error_message = error_message
    export.finished_at = utcnow()
    session.flush()
    return export
