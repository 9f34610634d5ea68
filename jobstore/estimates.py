"""Job estimates in the job store: create, claim (by exactly one worker), record the outcome, and give up on one
that no worker finished in time.

An estimate goes ``queued`` (``POST /jobs/estimate``, or the fit check of ``POST /jobs``) -> ``running`` (a worker
claimed it with a conditional update, so a redelivered message is harmless) -> ``succeeded`` (the engine's estimate
in ``result``) or ``failed`` (``error_kind`` and ``error_message``, as a job's). It is seconds of work with no
checkpoint to resume from, so nothing re-queues it: one that has not ended ``timeout_s`` after it was asked for is
failed where it is read (:func:`expire_estimate`) or where a worker would claim it (:func:`claim_estimate`: a
stale estimate nobody reads is never run ahead of jobs), and a worker that finishes it later records nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from jobstore.models import JobEstimate, Tenant, utcnow
from jobstore.redact import redact_json, redact_paths, strings_in
from jobstore.states import ErrorKind, JobStatus

QUEUED, RUNNING, SUCCEEDED, FAILED = (
    JobStatus.queued.value,
    JobStatus.running.value,
    JobStatus.succeeded.value,
    JobStatus.failed.value,
)
ENDED = frozenset({SUCCEEDED, FAILED})
PENDING = (QUEUED, RUNNING)


def create_estimate(
    session: Session,
    *,
    tenant_id: str,
    spec: dict[str, Any],
    queue: str,
    gpu_memory_gib: float | None,
    gpu_kind: str | None,
) -> JobEstimate:
    estimate = JobEstimate(
        tenant_id=tenant_id, spec=spec, queue=queue, status=QUEUED, gpu_memory_gib=gpu_memory_gib, gpu_kind=gpu_kind
    )
    session.add(estimate)
    session.flush()
    return estimate


def get_estimate(session: Session, *, estimate_id: str, tenant_id: str | None = None) -> JobEstimate | None:
    """The estimate (fresh from the database), or None; with ``tenant_id``, only that tenant's."""
    estimate = session.get(JobEstimate, estimate_id, populate_existing=True)
    if estimate is None or (tenant_id is not None and estimate.tenant_id != tenant_id):
        return None
    return estimate


def pending_count(session: Session, *, tenant_id: str, timeout_s: float) -> int:
    """How many of the tenant's estimates are queued or running and younger than ``timeout_s`` (older ones are
    failed when next read or claimed). Locks the tenant's row first (Postgres; a no-op on SQLite), so concurrent
    requests of one tenant count one after the other until they commit."""
    # FOR NO KEY UPDATE, as repository.active_job_count: serialises the tenant's requests, not inserts under it.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    count = session.scalar(
        select(func.count())
        .select_from(JobEstimate)
        .where(
            JobEstimate.tenant_id == tenant_id,
            JobEstimate.status.in_(PENDING),
            JobEstimate.created_at > utcnow() - timedelta(seconds=timeout_s),
        )
    )
    return int(count or 0)


def claim_estimate(session: Session, *, estimate_id: str, timeout_s: float) -> JobEstimate | None:
    """Take a queued estimate for this worker; None when another worker has it, it ended (given up on), or it is
    gone. One asked for ``timeout_s`` or more ago is failed instead, saying no worker took it in time: whoever
    asked was answered without it (``POST /jobs`` accepted the job, or a poller gave up), and a worker must not
    spend time on it ahead of jobs."""
    estimate = get_estimate(session, estimate_id=estimate_id)
    if estimate is None or expire_estimate(session, estimate=estimate, timeout_s=timeout_s).status != QUEUED:
        return None
    claimed = session.execute(
        update(JobEstimate)
        .where(JobEstimate.id == estimate_id, JobEstimate.status == QUEUED)
        .values(status=RUNNING, started_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        return None
    return session.get(JobEstimate, estimate_id, populate_existing=True)


def finish_estimate(
    session: Session,
    *,
    estimate_id: str,
    result: dict[str, Any] | None = None,
    error_kind: ErrorKind | None = None,
    error_message: str | None = None,
) -> bool:
    """Record a running estimate's outcome: ``result`` (succeeded) or the error (failed). False when it is no
    longer running (given up on meanwhile): nothing is written. Worker file paths are kept out of what the tenant
    reads (:mod:`jobstore.redact`), but those its spec names."""
    estimate = session.get(JobEstimate, estimate_id, populate_existing=True)
    if estimate is None:
        return False
    own = strings_in(estimate.spec)
    done = session.execute(
        update(JobEstimate)
        .where(JobEstimate.id == estimate_id, JobEstimate.status == RUNNING)
        .values(
            status=FAILED if error_kind is not None else SUCCEEDED,
            result=redact_json(result, own) if result is not None else None,
            error_kind=error_kind.value if error_kind is not None else None,
            error_message=redact_paths(error_message, own) if error_message is not None else None,
            finished_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return getattr(done, "rowcount", 0) == 1


def expire_estimate(session: Session, *, estimate: JobEstimate, timeout_s: float) -> JobEstimate:
    """Fail ``estimate`` if it has not ended ``timeout_s`` seconds after it was asked for (no worker of its queue
    took it, or the one that did died or hangs); conditional on its status, so a worker's outcome recorded just
    before wins. Returns the estimate as it is now."""
    if estimate.status in ENDED or _age_s(estimate.created_at) < timeout_s:
        return estimate
    waited = f"{timeout_s:.0f} s"
    if estimate.status == QUEUED:
        message = (
            f"no worker of queue {estimate.queue!r} took this estimate within {waited}: no worker consumes that "
            "queue, or its workers were busy with jobs; try again, or name a queue whose workers are free"
        )
    else:
        message = f"the worker that took this estimate did not finish it within {waited}; try again"
    session.execute(
        update(JobEstimate)
        .where(JobEstimate.id == estimate.id, JobEstimate.status == estimate.status)
        .values(status=FAILED, error_kind=ErrorKind.system_error.value, error_message=message, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.flush()
    fresh = get_estimate(session, estimate_id=estimate.id)
    assert fresh is not None  # the row goes only with its tenant
    return fresh


def _age_s(created_at: datetime) -> float:
    # SQLite hands back naive datetimes (stored in UTC).
    created = created_at if created_at.tzinfo is not None else created_at.replace(tzinfo=utcnow().tzinfo)
    return (utcnow() - created) / timedelta(seconds=1)
