"""``/jobs``: create (commit, then enqueue by task name), list, get, cancel.

The job row is committed before the message is sent, so a worker never receives an id it cannot find; if the
broker is down the job simply stays queued and the worker's sweeper sends it again (Postgres, not Redis, is the
source of truth).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response, status
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.orm import Session

from api.deps import After, CurrentTenant, Limit, ServicesDep, SessionDep
from api.errors import ApiError, not_found
from api.schemas import ErrorResponse, JobPublic, JobsPublic, job_public
from jobstore import repository
from jobstore.broker import enqueue_job
from jobstore.models import Job
from jobstore.spec import JobSpec
from jobstore.states import IllegalTransition, JobStatus

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

ENDPOINT = "POST /jobs"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Retry safely: the same key with the same body returns the job created the first time.",
    ),
]

UNAUTHORIZED: dict[str, Any] = {"model": ErrorResponse, "description": "Missing or invalid API key."}
JOB_NOT_FOUND: dict[str, Any] = {"model": ErrorResponse, "description": "No such job for this tenant."}


def get_tenant_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """The tenant's job, or 404 (another tenant's job is indistinguishable from a missing one)."""
    job = repository.get_job(session, job_id=job_id, tenant_id=tenant_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def _request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _replay(session: Session, *, tenant_id: str, key: str, request_hash: str) -> JobPublic | None:
    record = repository.find_idempotency_key(session, tenant_id=tenant_id, endpoint=ENDPOINT, key=key)
    if record is None:
        return None
    if record.request_hash != request_hash:
        raise ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different job spec; use a new key for a new job",
            param="Idempotency-Key",
        )
    job = repository.get_job(session, job_id=record.resource_id, tenant_id=tenant_id)
    if job is None:  # jobs are not deleted; only reachable if the tenant's data was edited by hand
        raise ApiError(409, "idempotency_key_reused", "this Idempotency-Key's job no longer exists; use a new key")
    return job_public(job)


def _check_dataset(session: Session, *, tenant_id: str, dataset_id: str, param: str) -> None:
    """404 unless the tenant owns the dataset; holds a share lock on it (Postgres) until the job commits, so a
    concurrent delete either sees the new job or happens first."""
    dataset = repository.get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id, param=param)
    try:
        session.refresh(dataset, with_for_update={"read": True})
    except InvalidRequestError as error:  # deleted while we waited for the lock
        raise not_found("dataset", dataset_id, param=param) from error


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a fine-tuning job",
    description="Validates the spec, records the job as queued and sends it to a worker queue (the spec's queue, "
    "else the service's default). Returns 200 instead of 201 when an Idempotency-Key replays an earlier request.",
    responses={
        200: {"model": JobPublic, "description": "Replayed: the job an earlier request with this key created."},
        401: UNAUTHORIZED,
        404: {"model": ErrorResponse, "description": "dataset_id or evaluation.dataset_id is not this tenant's."},
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with a different body."},
        422: {"model": ErrorResponse, "description": "Invalid spec; param names the field."},
    },
)
def create_job(
    spec: JobSpec,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    body = spec.model_dump(mode="json")
    request_hash = _request_hash(body)
    tenant_id = tenant.id
    if idempotency_key is not None:
        replayed = _replay(session, tenant_id=tenant_id, key=idempotency_key, request_hash=request_hash)
        if replayed is not None:
            response.status_code = status.HTTP_200_OK
            return replayed
    _check_dataset(session, tenant_id=tenant_id, dataset_id=spec.dataset_id, param="dataset_id")
    if spec.evaluation is not None and spec.evaluation.dataset_id:
        _check_dataset(
            session, tenant_id=tenant_id, dataset_id=spec.evaluation.dataset_id, param="evaluation.dataset_id"
        )
    queue = spec.queue or services.settings.default_queue
    job = repository.create_job(session, tenant_id=tenant_id, spec=body, dataset_id=spec.dataset_id, queue=queue)
    if idempotency_key is not None:
        repository.remember_idempotency_key(
            session,
            tenant_id=tenant_id,
            endpoint=ENDPOINT,
            key=idempotency_key,
            request_hash=request_hash,
            resource_id=job.id,
        )
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer with its job.
        session.rollback()
        if idempotency_key is None:
            raise
        replayed = _replay(session, tenant_id=tenant_id, key=idempotency_key, request_hash=request_hash)
        if replayed is None:
            raise ApiError(
                409, "idempotency_conflict", "a concurrent request used this Idempotency-Key; retry"
            ) from None
        response.status_code = status.HTTP_200_OK
        return replayed
    public = job_public(job)
    try:
        enqueue_job(services.celery, job_id=job.id, queue=queue)
    except Exception as error:  # broker down: the job is safe in the job store; the sweeper re-sends it
        logger.warning(
            "job %s is queued but could not be sent to queue %r (%s); the sweeper will", job.id, queue, error
        )
    else:
        logger.info("job %s queued on %r for tenant %s", job.id, queue, tenant_id)
    return public


@router.get("", summary="List jobs", responses={401: UNAUTHORIZED})
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    status_filter: Annotated[
        JobStatus | None, Query(alias="status", description="Only jobs in this status.", examples=["running"])
    ] = None,
    limit: Limit = 20,
    after: After = None,
) -> JobsPublic:
    rows, has_more = repository.list_jobs(
        session,
        tenant_id=tenant.id,
        limit=limit,
        after=after,
        status=status_filter.value if status_filter is not None else None,
    )
    return JobsPublic(
        data=[job_public(row) for row in rows],
        has_more=has_more,
        next_cursor=rows[-1].id if has_more and rows else None,
    )


@router.get("/{job_id}", summary="Get a job", responses={401: UNAUTHORIZED, 404: JOB_NOT_FOUND})
def get_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    return job_public(get_tenant_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a job",
    description="A queued job is cancelled at once; a running one becomes 'cancelling' and stops within one "
    "optimizer step. Cancelling a job that is already cancelling is a no-op.",
    responses={
        401: UNAUTHORIZED,
        404: JOB_NOT_FOUND,
        409: {"model": ErrorResponse, "description": "The job already ended (succeeded, failed or cancelled)."},
    },
)
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    job = get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    # Lock the row first (Postgres) so a worker claiming the job right now waits and then finds it cancelled.
    session.refresh(job, with_for_update=True)
    try:
        repository.request_cancel(session, job=job)
    except IllegalTransition as error:
        raise ApiError(
            409,
            "job_not_cancellable",
            f"the job already ended ({job.status}); only queued or running jobs can be cancelled",
        ) from error
    session.commit()
    return job_public(job)
