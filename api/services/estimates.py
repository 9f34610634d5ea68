"""Job estimates: ask a worker what a job would take, wait a little for its answer, look one up, and refuse a job
that does not fit the workers' GPUs.

The API has no transformers, so the counting is a short worker task (:mod:`worker.estimates`) on the job's queue.
The row is committed before the message is sent; then the request waits (polling the row, a few times a second)
up to DAMA_ESTIMATE_WAIT_S for the outcome. An estimate no worker finished DAMA_ESTIMATE_TIMEOUT_S after it was
asked for is failed where it is read or claimed (:mod:`jobstore.estimates`), so a poller always sees an end, and
its message expires then. A tenant has at most DAMA_MAX_PENDING_ESTIMATES queued or running.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from api.deps import Services
from api.errors import ApiError, not_found
from api.services.sending import send_committed
from dama_client.estimate_report import gib, parts_text, peak_text
from jobstore import estimates
from jobstore.broker import enqueue_estimate
from jobstore.models import JobEstimate
from jobstore.states import ErrorKind

logger = logging.getLogger(__name__)

FIRST_POLL_S, MAX_POLL_S = 0.05, 0.25
UNSENT = "the estimate is failed at once (no sweeper sends estimates)"


def request_estimate(
    session: Session, services: Services, *, tenant_id: str, spec: dict[str, Any], queue: str, wait_s: float
) -> JobEstimate:
    """Create the estimate of a checked job spec (see :func:`start_estimate`) and wait up to ``wait_s`` for it to
    end; the estimate as it is then. 429 ``too_many_pending_estimates`` while the tenant has
    DAMA_MAX_PENDING_ESTIMATES queued or running."""
    estimate_id = start_estimate(session, services, tenant_id=tenant_id, spec=spec, queue=queue, refuse_over_limit=True)
    assert estimate_id is not None  # over the limit it refused
    return wait_for_estimate(session, estimate_id=estimate_id, wait_s=wait_s)


def start_estimate(
    session: Session,
    services: Services,
    *,
    tenant_id: str,
    spec: dict[str, Any],
    queue: str,
    refuse_over_limit: bool,
) -> str | None:
    """Record the estimate of a checked job spec (measured against the operator's DAMA_WORKER_GPU_MEMORY_GB and
    DAMA_WORKER_GPU_KIND), commit, send it to ``queue``; its id. One that cannot be sent (the broker is down) fails
    at once: nothing would ever send it again. While the tenant has DAMA_MAX_PENDING_ESTIMATES queued or running:
    429 ``too_many_pending_estimates`` when ``refuse_over_limit``, else None (nothing recorded)."""
    settings = services.settings
    # Locks the tenant's row until the commit below, so concurrent requests count one after the other.
    pending = estimates.pending_count(session, tenant_id=tenant_id, timeout_s=settings.estimate_timeout_s)
    if pending >= (limit := settings.max_pending_estimates):
        session.rollback()
        if not refuse_over_limit:
            return None
        raise ApiError(
            429,
            "too_many_pending_estimates",
            f"this account has {pending} job estimates queued or running, the most it may have at once ({limit}, "
            "DAMA_MAX_PENDING_ESTIMATES); wait for one to end (GET /jobs/estimates/{estimate_id}), then retry",
            headers={"Retry-After": "10"},
        )
    estimate = estimates.create_estimate(
        session,
        tenant_id=tenant_id,
        spec=spec,
        queue=queue,
        gpu_memory_gib=settings.worker_gpu_memory_gb,
        gpu_kind=settings.worker_gpu_kind,
    )
    estimate_id = estimate.id
    session.commit()
    send = partial(enqueue_estimate, expires_s=settings.estimate_timeout_s)
    if not send_committed(send, services.celery, queue=queue, then=UNSENT, estimate_id=estimate_id):
        _fail_unsent(session, estimate_id=estimate_id, queue=queue, timeout_s=settings.estimate_timeout_s)
    return estimate_id


def _fail_unsent(session: Session, *, estimate_id: str, queue: str, timeout_s: float) -> None:
    claimed = estimates.claim_estimate(session, estimate_id=estimate_id, timeout_s=timeout_s)
    if claimed is not None:
        message = f"the estimate could not be sent to the workers of queue {queue!r} (the broker is unreachable); retry"
        estimates.finish_estimate(
            session, estimate_id=estimate_id, error_kind=ErrorKind.system_error, error_message=message
        )
    session.commit()


def wait_for_estimate(session: Session, *, estimate_id: str, wait_s: float) -> JobEstimate:
    """The estimate once it ended, or as it is after ``wait_s`` seconds. Each look is its own short transaction,
    so the worker's commit is seen and no snapshot or lock is held while waiting."""
    deadline, pause = time.monotonic() + wait_s, FIRST_POLL_S
    while True:
        estimate = estimates.get_estimate(session, estimate_id=estimate_id)
        assert estimate is not None  # committed above; it goes only with its tenant
        left = deadline - time.monotonic()
        if estimate.status in estimates.ENDED or left <= 0:
            return estimate
        session.rollback()
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, MAX_POLL_S)


def get_tenant_estimate(session: Session, services: Services, *, tenant_id: str, estimate_id: str) -> JobEstimate:
    """The tenant's estimate (failed first if no worker finished it in DAMA_ESTIMATE_TIMEOUT_S), or 404 (another
    tenant's is indistinguishable from a missing one)."""
    estimate = estimates.get_estimate(session, estimate_id=estimate_id, tenant_id=tenant_id)
    if estimate is None:
        raise not_found("estimate", estimate_id)
    estimate = estimates.expire_estimate(session, estimate=estimate, timeout_s=services.settings.estimate_timeout_s)
    session.commit()
    return estimate


def refuse_user_error(estimate: JobEstimate) -> None:
    """400 ``estimate_failed`` with the worker's message when the estimate failed on the spec, data or model (the
    job would fail the same way in its validating stage)."""
    if estimate.status == estimates.FAILED and estimate.error_kind == ErrorKind.user_error.value:
        raise ApiError(400, "estimate_failed", estimate.error_message or "the estimate failed")


def refuse_unfit(session: Session, services: Services, *, tenant_id: str, spec: dict[str, Any], queue: str) -> None:
    """The fit check of ``POST /jobs``, with DAMA_WORKER_GPU_MEMORY_GB only: estimate the job (waiting up to
    DAMA_ESTIMATE_WAIT_S; ``session`` must hold no transaction: it commits, and holds no connection while it
    waits) and answer 400 ``does_not_fit`` when the worker says it does not fit, naming what to change. An
    estimate that did not end in time, or failed, lets the job through (its own ``validating`` stage reports bad
    input); it stays stored. So does a tenant's job while it has DAMA_MAX_PENDING_ESTIMATES estimates pending
    (none is made: estimates must not crowd the workers)."""
    settings = services.settings
    if settings.worker_gpu_memory_gb is None:
        return
    estimate_id = start_estimate(
        session, services, tenant_id=tenant_id, spec=spec, queue=queue, refuse_over_limit=False
    )
    if estimate_id is None:
        logger.info("tenant %s has too many pending estimates: the job is accepted without a fit check", tenant_id)
        return
    estimate = wait_for_estimate(session, estimate_id=estimate_id, wait_s=settings.estimate_wait_s)
    figures = estimate.result if estimate.status == estimates.SUCCEEDED else None
    status = estimate.status
    session.rollback()  # the last look's transaction: the checks that follow start their own
    if figures is None:
        logger.info("estimate %s is %s: the job is accepted without a fit check", estimate_id, status)
        return
    if figures.get("fits") is False:
        raise ApiError(400, "does_not_fit", unfit_message(estimate_id, figures))


def unfit_message(estimate_id: str, figures: dict[str, Any]) -> str:
    """Why a job does not fit and what to change, from its estimate's figures: the peak, then its parts with the
    rule that makes the peak of them (:mod:`dama_client.estimate_report`, as the CLI prints them)."""
    memory = figures.get("memory") or {}
    advice = [str(item) for item in figures.get("advice") or []]
    fixes = "; ".join(advice) if advice else "use a smaller batch_size, gradient_checkpointing, fsdp or more GPUs"
    return (
        f"this job needs about {peak_text(memory)}, more than the {gib(figures.get('gpu_memory_gib'))} of "
        f"one worker GPU (DAMA_WORKER_GPU_MEMORY_GB); {parts_text(memory)}. What to change: {fixes}. "
        f"The whole estimate: {estimate_id}"
    )
