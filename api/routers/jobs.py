"""``/jobs``: create (commit, then enqueue by task name), list, get, cancel.

The job row is committed before the message is sent, so a worker never receives an id it cannot find; if the
broker is down the job simply stays queued and the worker's sweeper sends it again (Postgres, not Redis, is the
source of truth).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response, status
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.orm import Session

from api.deps import After, CurrentTenant, Limit, Services, ServicesDep, SessionDep
from api.errors import ApiError, not_found
from api.schemas import ErrorResponse, JobPublic, JobsPublic, job_public
from jobstore import quota, repository
from jobstore.artifacts import ArtifactStore
from jobstore.broker import enqueue_job
from jobstore.models import Dataset, Job
from jobstore.spec import JobSpec
from jobstore.states import IllegalTransition, JobStatus

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

ENDPOINT = "POST /jobs"
GENERATIVE_FORMAT = "generative"  # the format of a generative evaluation dataset (dama_engine.data.check)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Retry safely: the same key with the same body returns the job created the first time "
        "(1-200 characters, no control characters).",
    ),
]

UNAUTHORIZED: dict[str, Any] = {"model": ErrorResponse, "description": "Missing or invalid API key."}
JOB_NOT_FOUND: dict[str, Any] = {"model": ErrorResponse, "description": "No such job for this tenant."}
STORAGE_FULL: dict[str, Any] = {
    "model": ErrorResponse,
    "description": "storage_quota_exceeded: the tenant stores DAMA_TENANT_STORAGE_BYTES already.",
}


def get_tenant_job(session: Session, *, tenant_id: str, job_id: str, kind: str = repository.TRAINING) -> Job:
    """The tenant's job of this kind, or 404 (another tenant's job, or a job of another kind, is
    indistinguishable from a missing one)."""
    job = repository.get_job(session, job_id=job_id, tenant_id=tenant_id, kind=kind)
    if job is None:
        raise not_found("job" if kind == repository.TRAINING else kind, job_id)
    return job


def _request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _replay(session: Session, *, tenant_id: str, key: str, request_hash: str, endpoint: str, kind: str) -> Job | None:
    record = repository.find_idempotency_key(session, tenant_id=tenant_id, endpoint=endpoint, key=key)
    if record is None:
        return None
    if record.request_hash != request_hash:
        raise ApiError(
            409,
            "idempotency_key_reused",
            f"this Idempotency-Key was used with a different {kind} spec; use a new key for a new {kind}",
            param="Idempotency-Key",
        )
    job = repository.get_job(session, job_id=record.resource_id, tenant_id=tenant_id, kind=kind)
    if job is None:  # jobs are not deleted; only reachable if the tenant's data was edited by hand
        raise ApiError(409, "idempotency_key_reused", "this Idempotency-Key's job no longer exists; use a new key")
    return job


def check_dataset(
    session: Session, *, tenant_id: str, dataset_id: str, param: str, generative: bool = False
) -> Dataset:
    """404 unless the tenant owns the dataset, 422 unless it is of the right kind (a generative evaluation set
    when ``generative``, preference pairs otherwise); holds a share lock on it (Postgres) until the job commits,
    so a concurrent delete either sees the new job or happens first."""
    dataset = repository.get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id, param=param)
    try:
        session.refresh(dataset, with_for_update={"read": True})
    except InvalidRequestError as error:  # deleted while we waited for the lock
        raise not_found("dataset", dataset_id, param=param) from error
    is_generative = dataset.format == GENERATIVE_FORMAT
    if generative and not is_generative:
        raise ApiError(
            422,
            "dataset_not_generative",
            f"{param}: dataset {dataset_id} holds preference pairs ({dataset.format}); give a generative evaluation "
            "dataset (JSONL of image, prompt, objects plus vocabulary.json)",
            param=param,
        )
    if not generative and is_generative:
        raise ApiError(
            422,
            "dataset_is_generative",
            f"{param}: dataset {dataset_id} is a generative evaluation set; it can only be used as "
            "a generative_dataset_id",
            param=param,
        )
    return dataset


def check_init_adapter(session: Session, store: ArtifactStore, *, tenant_id: str, spec: JobSpec) -> None:
    """404 unless ``init_adapter`` names this tenant's training job and a kept checkpoint (or, bare, a succeeded
    job); 422 unless that job trained the same base model with LoRA."""
    source = spec.init_source
    if source is None:
        return
    param, (job_id, step) = "init_adapter", source
    job = repository.get_job(session, job_id=job_id, tenant_id=tenant_id, kind=repository.TRAINING)
    if job is None:
        raise not_found("job", job_id, param=param)
    origin = JobSpec.model_validate(job.spec)
    if origin.model != spec.model or not origin.lora.enabled or not spec.lora.enabled:
        raise ApiError(
            422,
            "init_adapter_mismatch",
            f"{param}: job {job_id} trained a {'LoRA adapter' if origin.lora.enabled else 'full fine-tune'} of "
            f"{origin.model}; a start needs a LoRA adapter of this job's model ({spec.model}) and lora.enabled",
            param=param,
        )
    if step is None and job.status != JobStatus.succeeded.value:
        raise ApiError(
            422,
            "init_adapter_not_ready",
            f"{param}: job {job_id} is {job.status}; its final adapter exists once it has succeeded (or start "
            f"from a kept checkpoint: '{job_id}:STEP')",
            param=param,
        )
    if step is not None:
        checkpoint = repository.get_checkpoint(session, job_id=job_id, step=step)
        if checkpoint is None or store.checkpoint_adapter_dir(job_id, checkpoint.path) is None:
            kept = [item.step for item in repository.list_checkpoints(session, job_id=job_id)]
            raise ApiError(
                404,
                "checkpoint_not_found",
                f"{param}: job {job_id} has no kept checkpoint with an adapter at step {step} (kept: {kept or 'none'})",
                param=param,
            )


def submit_job(
    session: Session,
    services: Services,
    response: Response,
    *,
    tenant_id: str,
    body: dict[str, Any],
    kind: str,
    endpoint: str,
    dataset_id: str | None,
    queue: str | None,
    idempotency_key: str | None,
    check: Callable[[], None],
) -> Job:
    """Create a queued job of ``kind`` (after ``check`` validated what it refers to), commit, then enqueue it by
    task name; with an Idempotency-Key, a retry answers the job made the first time (status 200)."""
    request_hash = _request_hash(body)

    def replay() -> Job | None:
        """The job an earlier request with this Idempotency-Key created (answered with 200), if any."""
        if idempotency_key is None:
            return None
        job = _replay(
            session, tenant_id=tenant_id, key=idempotency_key, request_hash=request_hash, endpoint=endpoint, kind=kind
        )
        if job is not None:
            response.status_code = status.HTTP_200_OK
        return job

    if (replayed := replay()) is not None:
        return replayed
    if body.get("trust_remote_code") and not services.settings.allow_remote_code:
        raise ApiError(
            422,
            "remote_code_not_allowed",
            "this service does not run model repositories' own code (trust_remote_code); its operator can allow "
            "it with DAMA_ALLOW_REMOTE_CODE=true",
            param="trust_remote_code",
        )
    check()
    # A run writes checkpoints and an adapter: refused while the account's storage is full.
    what, quota_bytes = f"starting another {kind} job", services.settings.tenant_storage_bytes
    if full := quota.full_message(session, tenant_id=tenant_id, quota=quota_bytes, what=what):
        raise ApiError(403, "storage_quota_exceeded", full)
    limit = services.settings.max_active_jobs
    if limit is not None:
        active = repository.active_job_count(session, tenant_id=tenant_id)
        # A retry that waited on the lock behind its own first request answers that request's job.
        if (replayed := replay()) is not None:
            return replayed
        if active >= limit:
            raise ApiError(
                429,
                "too_many_active_jobs",
                f"this account has {active} queued or running jobs, the most it may have at once ({limit}); "
                "wait for one to end or cancel one, then retry",
                headers={"Retry-After": "60"},
            )
    queue = queue or services.settings.default_queue
    try:
        job = repository.create_job(
            session, tenant_id=tenant_id, spec=body, dataset_id=dataset_id, queue=queue, kind=kind
        )
        if idempotency_key is not None:
            # Inserting the key waits for a concurrent request's uncommitted row with the same key and fails
            # once that one commits: the flush, not only the commit, may raise.
            repository.remember_idempotency_key(
                session,
                tenant_id=tenant_id,
                endpoint=endpoint,
                key=idempotency_key,
                request_hash=request_hash,
                resource_id=job.id,
            )
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer with its job (or 409, another body).
        session.rollback()
        if idempotency_key is None:
            raise
        if (replayed := replay()) is None:
            raise ApiError(
                409,
                "idempotency_conflict",
                "a concurrent request used this Idempotency-Key; retry",
                param="Idempotency-Key",
            ) from None
        return replayed
    try:
        enqueue_job(services.celery, job_id=job.id, queue=queue)
    except Exception as error:  # broker down: the job is safe in the job store; the sweeper re-sends it
        logger.warning(
            "job %s is queued but could not be sent to queue %r (%s); the sweeper will", job.id, queue, error
        )
    else:
        logger.info("%s job %s queued on %r for tenant %s", kind, job.id, queue, tenant_id)
    return job


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a fine-tuning job",
    description="Validates the spec, records the job as queued and sends it to a worker queue (the spec's queue, "
    "else the service's default). Returns 200 instead of 201 when an Idempotency-Key replays an earlier request.",
    responses={
        200: {"model": JobPublic, "description": "Replayed: the job an earlier request with this key created."},
        400: {
            "model": ErrorResponse,
            "description": "filter_group_too_small: the model-aware filter would see fewer pairs than it needs "
            "(shared/DAMA.md 2.5); the message names both fixes. unknown_tracking_target: integrations[i].target "
            "names no tracking target of this service.",
        },
        401: UNAUTHORIZED,
        403: STORAGE_FULL,
        429: {
            "model": ErrorResponse,
            "description": "rate_limit_exceeded (the tenant's request rate), or too_many_active_jobs (the tenant "
            "already has DAMA_MAX_ACTIVE_JOBS queued or running jobs); Retry-After says when to retry.",
        },
        404: {
            "model": ErrorResponse,
            "description": "dataset_id, evaluation.dataset_id or evaluation.generative_dataset_id is not this "
            "tenant's, or init_adapter names no job of this tenant or no kept checkpoint of it.",
        },
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with a different body."},
        422: {
            "model": ErrorResponse,
            "description": "Invalid spec, or a dataset of the wrong kind (a generative set as training or held-out "
            "pairs, or preference pairs as evaluation.generative_dataset_id), or an init_adapter of another base "
            "model or of a job that has not succeeded; param names the field.",
        },
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
    tenant_id = tenant.id
    if (problem := spec.filter_group_problem()) is not None:
        raise ApiError(400, "filter_group_too_small", problem, param="hyperparameters.filter_scope")

    def check() -> None:
        check_dataset(session, tenant_id=tenant_id, dataset_id=spec.dataset_id, param="dataset_id")
        check_init_adapter(session, services.artifacts, tenant_id=tenant_id, spec=spec)
        for index, integration in enumerate(spec.integrations):
            if integration.target not in services.settings.tracking_targets:
                known = sorted(services.settings.tracking_targets) or "none are defined"
                raise ApiError(
                    400,
                    "unknown_tracking_target",
                    f"integrations[{index}].target: no tracking target {integration.target!r} on this service "
                    f"(known: {known})",
                    param=f"integrations[{index}].target",
                )
        evaluation = spec.evaluation
        if evaluation is not None and evaluation.dataset_id:
            check_dataset(session, tenant_id=tenant_id, dataset_id=evaluation.dataset_id, param="evaluation.dataset_id")
        if evaluation is not None and evaluation.generative_dataset_id:
            check_dataset(
                session,
                tenant_id=tenant_id,
                dataset_id=evaluation.generative_dataset_id,
                param="evaluation.generative_dataset_id",
                generative=True,
            )

    job = submit_job(
        session,
        services,
        response,
        tenant_id=tenant_id,
        body=spec.model_dump(mode="json"),
        kind=repository.TRAINING,
        endpoint=ENDPOINT,
        dataset_id=spec.dataset_id,
        queue=spec.queue,
        idempotency_key=idempotency_key,
        check=check,
    )
    return job_public(job)


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
        kind=repository.TRAINING,
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
    cancel_or_conflict(session, job, noun="job")
    return job_public(job)


def cancel_or_conflict(session: Session, job: Job, *, noun: str) -> None:
    """Cancel (queued) or ask to cancel (running) and commit; 409 when the job already ended. The repository locks
    the row first, so a worker claiming it right now waits and then finds it cancelled."""
    try:
        repository.request_cancel(session, job=job)
    except IllegalTransition as error:
        raise ApiError(
            409,
            f"{noun}_not_cancellable",
            f"the {noun} already ended ({job.status}); only queued or running {noun}s can be cancelled",
        ) from error
    session.commit()
