"""``/jobs``: create, list, get, cancel training jobs (the work is in :mod:`api.services.jobs`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from api.deps import After, CurrentTenant, IdempotencyKey, Limit, ServicesDep, SessionDep
from api.responses import (
    JOB_NOT_FOUND,
    SPEC_INVALID,
    SPEC_REFERENCE_NOT_FOUND,
    STORAGE_FULL,
    TOO_MANY_ACTIVE,
    UNAUTHORIZED,
)
from api.schemas import ErrorResponse, JobPublic, JobsPublic
from api.services import jobs
from jobstore.spec import JobSpec
from jobstore.states import JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a fine-tuning job",
    description="Validates the spec, records the job as queued and sends it to a worker queue (the spec's queue, "
    "else the service's default). Returns 200 instead of 201 when an Idempotency-Key replays an earlier request. "
    "With DAMA_WORKER_GPU_MEMORY_GB set, the job is estimated first (as POST /jobs/estimate, waiting up to "
    "DAMA_ESTIMATE_WAIT_S for a worker) and refused when it does not fit; one not estimated in time, or whose "
    "estimate failed, is accepted, and so is one sent while the tenant has DAMA_MAX_PENDING_ESTIMATES estimates "
    "queued or running (none is made).",
    responses={
        200: {"model": JobPublic, "description": "Replayed: the job an earlier request with this key created."},
        400: {
            "model": ErrorResponse,
            "description": "filter_group_too_small: the model-aware filter would see fewer pairs than it needs "
            "(shared/DAMA.md 2.5); the message names both fixes. unknown_tracking_target: integrations[i].target "
            "names no tracking target of this service. unknown_model: a `dama/...` model that is not a built-in "
            "model (GET /models lists them). hardness_required: method dama or dama_data on a dataset whose rows "
            "carry no hardness while the service has no CLIP scorer; the message names the fixes. does_not_fit: "
            "with DAMA_WORKER_GPU_MEMORY_GB set, the job's estimate (POST /jobs/estimate) says it needs more memory "
            "per GPU than the workers' GPUs have; the message gives the peak and what to change (gradient "
            "checkpointing, batch size, fsdp, more GPUs).",
        },
        401: UNAUTHORIZED,
        403: STORAGE_FULL,
        429: TOO_MANY_ACTIVE,
        404: SPEC_REFERENCE_NOT_FOUND,
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with a different body."},
        422: SPEC_INVALID,
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
    job, replayed = jobs.create_training_job(
        session, services, tenant_id=tenant.id, spec=spec, idempotency_key=idempotency_key
    )
    if replayed:
        response.status_code = status.HTTP_200_OK
    return JobPublic.model_validate(job)


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
    rows, has_more = jobs.list_jobs(
        session, tenant_id=tenant.id, kind=jobs.TRAINING, status=status_filter, limit=limit, after=after
    )
    return JobsPublic.of(rows, has_more=has_more)


@router.get("/{job_id}", summary="Get a job", responses={401: UNAUTHORIZED, 404: JOB_NOT_FOUND})
def get_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    return JobPublic.model_validate(jobs.get_tenant_job(session, tenant_id=tenant.id, job_id=job_id))


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
    return JobPublic.model_validate(jobs.cancel(session, tenant_id=tenant.id, job_id=job_id))
