"""Per-tenant storage: what a tenant stores, counted in the job store, against ``DAMA_TENANT_STORAGE_BYTES``.

A tenant's storage is its datasets' ``size_bytes`` (the files kept after the check, not the upload) plus its jobs'
``storage_bytes`` (everything under the job's folder: checkpoints, the adapter and its archive, evaluation outputs;
measured by the worker each time a run ends). Decisions that add storage lock the tenant's row first
(:func:`lock_tenant`), so two concurrent uploads cannot both fit in the same remaining bytes. The API refuses an
upload or a job submission once the quota is reached; the worker refuses to start a run then, and fails a run
whose files push the tenant over (its files are removed): see README, "Storage".
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobstore.artifacts import path_bytes
from jobstore.models import Dataset, Job, Tenant

SETTING = "DAMA_TENANT_STORAGE_BYTES"
folder_bytes = path_bytes  # the bytes a dataset's or job's local files take


def tenant_storage_bytes(session: Session, *, tenant_id: str) -> int:
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    )
    jobs = session.scalar(select(func.coalesce(func.sum(Job.storage_bytes), 0)).where(Job.tenant_id == tenant_id))
    return int(datasets or 0) + int(jobs or 0)


def lock_tenant(session: Session, *, tenant_id: str) -> None:
    """Serialize storage decisions of one tenant until the transaction ends (a row lock on Postgres)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def over_quota_message(*, used: int, adding: int, quota: int, what: str) -> str:
    """A message naming the setting, for a tenant storing ``used`` bytes that ``what`` would grow by ``adding``."""
    if adding:
        return (
            f"{what} ({adding} bytes) would take this account's storage to {used + adding} bytes, over its quota of "
            f"{quota} bytes ({SETTING}); delete datasets it no longer needs, or ask the operator for more"
        )
    return (
        f"this account stores {used} bytes, its whole quota of {quota} bytes ({SETTING}); delete datasets it no "
        f"longer needs, or ask the operator for more, before {what}"
    )


def full_message(session: Session, *, tenant_id: str, quota: int | None, what: str) -> str | None:
    """The message refusing ``what`` when the tenant's storage has reached ``quota``; None while there is room
    (always, without a quota)."""
    if quota is None:
        return None
    used = tenant_storage_bytes(session, tenant_id=tenant_id)
    return over_quota_message(used=used, adding=0, quota=quota, what=what) if used >= quota else None
