"""Merged exports of a training job: ask for one (a worker makes it), look one up, find its archive."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.deps import Services
from api.downloads import safe_label
from api.errors import ApiError
from api.services.jobs import get_tenant_job
from api.services.outputs import Archive
from api.services.sending import send_committed
from jobstore import exports
from jobstore.broker import enqueue_export
from jobstore.models import Export
from jobstore.states import JobStatus


def get_tenant_export(session: Session, *, tenant_id: str, job_id: str, export_id: str) -> Export:
    get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    export = exports.get_export(session, export_id=export_id, job_id=job_id)
    if export is None:
        raise ApiError(404, "export_not_found", f"no export {export_id} of job {job_id}", param="export_id")
    return export


def request_export(
    session: Session, services: Services, *, tenant_id: str, job_id: str, format: str
) -> tuple[Export, bool]:
    """(export, created): the export of ``format`` that is queued, running or done, else a new one, committed
    and then enqueued on the job's queue (a broker outage leaves it queued for the sweeper: not an error)."""
    job = get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.status != JobStatus.succeeded.value:
        raise ApiError(409, "job_not_succeeded", f"the job is {job.status}; only a succeeded job can be exported")
    existing = exports.reusable_export(session, job_id=job_id, format=format)
    if existing is not None:
        return existing, False
    export = exports.create_export(session, tenant_id=tenant_id, job_id=job_id, format=format, queue=job.queue)
    session.commit()
    send_committed(enqueue_export, services.celery, queue=job.queue, export_id=export.id)
    return export, True


def export_archive(session: Session, services: Services, *, tenant_id: str, job_id: str, export_id: str) -> Archive:
    """The succeeded export's archive; 409 before it succeeded, 404 when the store lost it."""
    export = get_tenant_export(session, tenant_id=tenant_id, job_id=job_id, export_id=export_id)
    if export.status != exports.SUCCEEDED or export.sha256 is None or export.path is None:
        raise ApiError(409, "export_not_ready", f"the export is {export.status}; download it once it has succeeded")
    store = services.artifacts
    # The row names the stored object (an s3:// URI with S3); the API streams it from the store, no local copy.
    archive = store.local_path(export.path)
    if not store.exists(archive):
        raise ApiError(404, "export_file_missing", "the export succeeded but its archive is missing from the store")
    job = get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    label = safe_label(job.spec.get("suffix") if isinstance(job.spec, dict) else None)
    stem = f"{job_id}-{label}" if label else job_id
    return Archive(path=archive, sha256=export.sha256, filename=f"{stem}-{export.format}.tar")


def list_exports(session: Session, *, tenant_id: str, job_id: str) -> list[Export]:
    """The tenant's job's exports, oldest first."""
    get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    return exports.list_exports(session, job_id=job_id)
