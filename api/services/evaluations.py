"""Evaluations: jobs of kind ``evaluation`` (id prefix ``eval_``), created, enqueued, claimed, run, cancelled
and recovered exactly like a training job (:mod:`api.services.jobs`), never visible under ``/jobs``."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from api.deps import Services
from api.errors import ApiError
from api.services.jobs import check_dataset, check_model_name, get_tenant_job, submit_job
from api.services.outputs import succeeded_run_output
from jobstore import repository
from jobstore.models import Job
from jobstore.spec import EvaluationCreate, JobSpec
from jobstore.states import JobStatus

ENDPOINT = "POST /evaluations"
KIND = repository.EVALUATION

# ?file= of GET /evaluations/{id}/outputs -> the artifact kind the worker registered.
OUTPUT_KINDS = {"generations": "eval_outputs", "pairs": "eval_pairs"}


def get_tenant_evaluation(session: Session, *, tenant_id: str, evaluation_id: str) -> Job:
    return get_tenant_job(session, tenant_id=tenant_id, job_id=evaluation_id, kind=KIND)


def _check_adapter_job(session: Session, *, tenant_id: str, spec: EvaluationCreate) -> None:
    """The adapter must come from a succeeded training job of this tenant, trained on ``spec.model``."""
    assert spec.adapter_job_id is not None
    job = repository.get_job(session, job_id=spec.adapter_job_id, tenant_id=tenant_id, kind=repository.TRAINING)
    if job is None:
        raise ApiError(404, "job_not_found", f"no training job with id {spec.adapter_job_id!r}", param="adapter_job_id")
    if job.status != JobStatus.succeeded.value:
        raise ApiError(
            409,
            "adapter_not_ready",
            f"adapter_job_id: job {job.id} is {job.status}; its adapter can be evaluated once it has succeeded",
            param="adapter_job_id",
        )
    trained_on = JobSpec.model_validate(job.spec).model
    if trained_on != spec.model:
        raise ApiError(
            422,
            "adapter_model_mismatch",
            f"adapter_job_id: job {job.id} trained an adapter for {trained_on!r}, not {spec.model!r}; "
            "set model to the training job's base model",
            param="model",
        )


def create_evaluation(
    session: Session, services: Services, *, tenant_id: str, spec: EvaluationCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """``POST /evaluations``: check the datasets and the adapter job, then :func:`submit_job`."""

    def check() -> None:
        check_model_name(spec.model)
        if spec.preference_dataset_id:
            check_dataset(
                session, tenant_id=tenant_id, dataset_id=spec.preference_dataset_id, param="preference_dataset_id"
            )
        if spec.generative_dataset_id:
            check_dataset(
                session,
                tenant_id=tenant_id,
                dataset_id=spec.generative_dataset_id,
                param="generative_dataset_id",
                generative=True,
            )
        if spec.adapter_job_id:
            _check_adapter_job(session, tenant_id=tenant_id, spec=spec)

    return submit_job(
        session,
        services,
        tenant_id=tenant_id,
        body=spec.model_dump(mode="json"),
        kind=KIND,
        endpoint=ENDPOINT,
        dataset_id=spec.preference_dataset_id or spec.generative_dataset_id,
        queue=spec.queue,
        idempotency_key=idempotency_key,
        check=check,
    )


def succeeded_output(
    session: Session, services: Services, *, tenant_id: str, evaluation_id: str, kind: str, what: str
) -> tuple[Path, str]:
    """The local path and sha256 of a succeeded evaluation's artifact of ``kind`` (:func:`succeeded_run_output`)."""
    job = get_tenant_evaluation(session, tenant_id=tenant_id, evaluation_id=evaluation_id)
    return succeeded_run_output(session, services, job=job, kind=kind, what=what)
