"""``/jobs/estimate``: what a job would take before it is launched (the work is in :mod:`api.services.jobs` and
:mod:`api.services.estimates`). Included before the job routes: ``/jobs/estimates/{id}`` is not a job's path."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from api.deps import CurrentTenant, ServicesDep, SessionDep
from api.estimate_schemas import EstimatePublic
from api.responses import (
    ESTIMATE_NOT_FOUND,
    SPEC_INVALID,
    SPEC_REFERENCE_NOT_FOUND,
    TOO_MANY_PENDING_ESTIMATES,
    UNAUTHORIZED,
)
from api.schemas import ErrorResponse
from api.services import estimates, jobs
from jobstore.spec import JobSpec

router = APIRouter(prefix="/jobs", tags=["jobs"])

Wait = Annotated[
    float | None,
    Query(
        ge=0,
        le=600,
        description="Seconds to wait for the worker's answer before answering 202 (at most, and by default, the "
        "operator's DAMA_ESTIMATE_WAIT_S; 0: answer 202 at once and poll).",
        examples=[10],
    ),
]


@router.post(
    "/estimate",
    summary="Estimate a fine-tuning job before launching it",
    description="Takes exactly the body of POST /jobs and checks it as POST /jobs does (the same 4xx), but queues "
    "no job: a worker of the job's queue reads the model's config and processor and the dataset's token lengths and "
    "answers rows, steps, tokens, peak memory per GPU (and under other strategies, gradient checkpointing, batch "
    "sizes and GPU counts), the expected wall time on the operator's GPU kind, and whether it fits the operator's "
    "GPUs (DAMA_WORKER_GPU_MEMORY_GB) with what to change if not. 200 when the worker answered within the wait "
    "(status succeeded; or failed with a system_error), else 202 with the estimate to poll (Location).",
    response_model=EstimatePublic,
    responses={
        200: {"description": "Answered within the wait: succeeded with the figures, or failed with a system_error."},
        202: {
            "model": EstimatePublic,
            "description": "Not answered yet: poll GET /jobs/estimates/{estimate_id} (the Location header).",
            "headers": {
                "Location": {"description": "The estimate to poll.", "schema": {"type": "string"}},
                "Retry-After": {"description": "Seconds to wait before polling.", "schema": {"type": "integer"}},
            },
        },
        400: {
            "model": ErrorResponse,
            "description": "The checks of POST /jobs (filter_group_too_small, unknown_model, hardness_required, "
            "unknown_tracking_target), or estimate_failed: the worker could not estimate the job because of its "
            "spec, data or model (the message says why; the job would fail the same way).",
        },
        401: UNAUTHORIZED,
        404: SPEC_REFERENCE_NOT_FOUND,
        422: SPEC_INVALID,
        429: TOO_MANY_PENDING_ESTIMATES,
    },
)
def estimate_job(
    spec: JobSpec, session: SessionDep, tenant: CurrentTenant, services: ServicesDep, wait: Wait = None
) -> Any:
    estimate = jobs.estimate_training_job(session, services, tenant_id=tenant.id, spec=spec, wait_s=wait)
    public = EstimatePublic.model_validate(estimate)
    if estimate.status in ("succeeded", "failed"):
        return public
    headers = {"Location": f"/jobs/estimates/{estimate.id}", "Retry-After": "2"}
    return JSONResponse(public.model_dump(mode="json"), status_code=202, headers=headers)


@router.get(
    "/estimates/{estimate_id}",
    summary="Get a job estimate",
    description="The estimate as it is now; one that no worker finished within DAMA_ESTIMATE_TIMEOUT_S of being "
    "asked for is failed, saying no worker answered.",
    responses={401: UNAUTHORIZED, 404: ESTIMATE_NOT_FOUND},
)
def get_estimate(estimate_id: str, session: SessionDep, tenant: CurrentTenant, services: ServicesDep) -> EstimatePublic:
    estimate = estimates.get_tenant_estimate(session, services, tenant_id=tenant.id, estimate_id=estimate_id)
    return EstimatePublic.model_validate(estimate)
