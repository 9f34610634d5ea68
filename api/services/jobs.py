"""Jobs of every kind (training, evaluation): look one up for a tenant, create one (checks, quota, limits,
idempotency, commit, then enqueue by task name), estimate a training job before it is created, cancel one.

The job row is committed before the message is sent (:func:`api.services.sending.send_committed`: a broker
outage leaves the job queued for the sweeper, never fails the request).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from api.deps import Services
from api.errors import ApiError, not_found
from api.services import estimates
from api.services.idempotency import IdempotentCreate, body_hash
from api.services.sending import send_committed
from dama_settings.rules import HARDNESS_METHODS
from jobstore import loops, quota, repository
from jobstore.artifacts import ArtifactStore
from jobstore.broker import enqueue_job
from jobstore.models import Dataset, Job, JobEstimate
from jobstore.spec import BUILTIN_MODELS, BUILTIN_PREFIX, JobSpec
from jobstore.states import IllegalTransition, JobStatus

logger = logging.getLogger(__name__)

TRAINING = repository.TRAINING
TRAINING_ENDPOINT = "POST /jobs"
GENERATIVE_FORMAT = "generative"  # the format of a generative evaluation dataset (dama_engine.data.check)
PROMPTS_FORMAT = "prompts"  # a generative set without objects: a pair generation's judge lists them


def get_tenant_job(session: Session, *, tenant_id: str, job_id: str, kind: str = repository.TRAINING) -> Job:
    """The tenant's job of this kind, or 404 (another tenant's job, or a job of another kind, is
    indistinguishable from a missing one)."""
    job = repository.get_job(session, job_id=job_id, tenant_id=tenant_id, kind=kind)
    if job is None:
        raise not_found("job" if kind == repository.TRAINING else kind, job_id)
    return job


def check_dataset(
    session: Session, *, tenant_id: str, dataset_id: str, param: str, generative: bool = False, prompts: bool = False
) -> Dataset:
    """404 unless the tenant owns the dataset, 422 unless it is of the right kind (a generative evaluation set
    when ``generative`` -- or a prompt set too, when ``prompts`` --, preference pairs otherwise); holds a share lock
    on it (Postgres) until the job commits, so a concurrent delete either sees the new job or happens first."""
    dataset = repository.get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id, param=param)
    if not repository.lock_dataset(session, dataset=dataset, shared=True):  # deleted while we waited for the lock
        raise not_found("dataset", dataset_id, param=param)
    if generative and dataset.format == PROMPTS_FORMAT and not prompts:
        raise ApiError(
            422,
            "dataset_not_generative",
            f"{param}: dataset {dataset_id} is a prompt set (images and prompts, no objects); this needs the objects "
            "of each image: give a generative dataset (image, prompt and objects plus vocabulary.json)",
            param=param,
        )
    if generative and dataset.format not in (GENERATIVE_FORMAT, PROMPTS_FORMAT):
        raise ApiError(
            422,
            "dataset_not_generative",
            f"{param}: dataset {dataset_id} holds preference pairs ({dataset.format}), with no objects per image; "
            "give a generative dataset (a JSONL file of image, prompt and objects plus vocabulary.json, uploaded "
            "with POST /datasets)",
            param=param,
        )
    if not generative and dataset.format in (GENERATIVE_FORMAT, PROMPTS_FORMAT):
        kind = "a generative evaluation set" if dataset.format == GENERATIVE_FORMAT else "a prompt set"
        raise ApiError(
            422,
            "dataset_is_generative",
            f"{param}: dataset {dataset_id} is {kind}; it can only be used as a generative_dataset_id",
            param=param,
        )
    return dataset


def check_model_name(model: str, *, param: str = "model") -> None:
    """400 ``unknown_model`` for a ``dama/...`` name that is not a built-in model (a typo would otherwise be sent
    to the hub by the worker, minutes later); other names are the workers' to load (checked in ``validating``)."""
    if not model.startswith(BUILTIN_PREFIX) or model in BUILTIN_MODELS:
        return
    close = difflib.get_close_matches(model, list(BUILTIN_MODELS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ApiError(
        400,
        "unknown_model",
        f"{param}: {model!r} is not a built-in model; {hint}the built-in models (GET /models) are "
        f"{', '.join(BUILTIN_MODELS)}",
        param=param,
    )


def check_hardness_source(services: Services, spec: JobSpec, dataset: Dataset) -> None:
    """400 ``hardness_required`` when the method weighs pairs by data hardness, the dataset's rows carry none
    (counted at upload) and this service has no CLIP scorer (``DAMA_HARDNESS_SCORER``) to compute it: the job
    would otherwise fail in its ``scoring`` stage, trying to fetch CLIP. A dataset checked before uploads counted
    such rows is left to the worker, which checks the scorer loads during ``validating``."""
    if spec.method not in HARDNESS_METHODS or services.settings.hardness_scorer is not None:
        return
    with_hardness = (dataset.report or {}).get("rows_with_hardness")
    if not isinstance(with_hardness, int) or with_hardness > 0:
        return
    raise ApiError(
        400,
        "hardness_required",
        f"method {spec.method!r} weighs each pair by its data hardness, but the rows of dataset {dataset.id} carry "
        "none and this service has no CLIP scorer to compute it (GET /models: hardness_scorer is null). Add a "
        "'hardness' value, or 'chosen_score' and 'rejected_score', to every row and upload it again; or use method "
        "'dpo' or 'dama_model', which need no hardness; or ask the operator to set DAMA_HARDNESS_SCORER to a CLIP "
        "model the workers can load",
        param="method",
    )


def with_service_scorer(services: Services, spec: JobSpec) -> JobSpec:
    """The spec with the operator's CLIP scorer (``DAMA_HARDNESS_SCORER``) when it names none itself, so the stored
    job says which scorer its data hardness came from."""
    scorer = services.settings.hardness_scorer
    if scorer is None or "hardness_scorer" in spec.model_fields_set:
        return spec
    return spec.model_copy(update={"hardness_scorer": scorer})


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


def _check_tracking_targets(services: Services, spec: JobSpec) -> None:
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


def check_room(session: Session, services: Services, *, tenant_id: str, kind: str) -> None:
    """403 while the account's storage is full (a run writes checkpoints and an adapter)."""
    what, quota_bytes = f"starting another {kind} job", services.settings.tenant_storage_bytes
    if full := quota.full_message(session, tenant_id=tenant_id, quota=quota_bytes, what=what):
        raise ApiError(403, "storage_quota_exceeded", full)


def refuse_remote_code(services: Services, *, trust_remote_code: bool) -> None:
    """422 when a run asks to run a model repository's own code and the operator does not allow it."""
    if trust_remote_code and not services.settings.allow_remote_code:
        raise ApiError(
            422,
            "remote_code_not_allowed",
            "this service does not run model repositories' own code (trust_remote_code); its operator can allow "
            "it with DAMA_ALLOW_REMOTE_CODE=true",
            param="trust_remote_code",
        )


def refuse_over_limit(*, active: int, limit: int) -> None:
    """429 once the tenant has DAMA_MAX_ACTIVE_JOBS queued or running jobs."""
    if active >= limit:
        raise ApiError(
            429,
            "too_many_active_jobs",
            f"this account has {active} queued or running jobs, the most it may have at once ({limit}); "
            "wait for one to end or cancel one, then retry",
            headers={"Retry-After": "60"},
        )


def submit_job(
    session: Session,
    services: Services,
    *,
    tenant_id: str,
    body: dict[str, Any],
    kind: str,
    endpoint: str,
    dataset_id: str | None,
    queue: str | None,
    idempotency_key: str | None,
    check: Callable[[], None],
    precheck: Callable[[], None] | None = None,
) -> tuple[Job, bool]:
    """Create a queued job of ``kind`` (after ``check`` validated what it refers to), commit, then enqueue it by
    task name; (job, replayed): with an Idempotency-Key, a retry answers the job made the first time. ``precheck``
    runs after that replay and before ``check``, for slow work that must hold no lock (it ends its transactions;
    ``check`` and the limits then run afresh under their locks)."""
    request = IdempotentCreate(
        tenant_id=tenant_id, endpoint=endpoint, key=idempotency_key, request_hash=body_hash(body), what=f"{kind} spec"
    )

    def find(job_id: str) -> Job | None:
        return repository.get_job(session, job_id=job_id, tenant_id=tenant_id, kind=kind)

    if (replayed := request.replay(session, find)) is not None:
        return replayed, True
    refuse_remote_code(services, trust_remote_code=bool(body.get("trust_remote_code")))
    if precheck is not None:
        precheck()
    check()
    check_room(session, services, tenant_id=tenant_id, kind=kind)
    if (limit := services.settings.max_active_jobs) is not None:
        active = repository.active_job_count(session, tenant_id=tenant_id)  # takes the tenant's lock (Postgres)
        # A retry that waited on the lock behind its own first request answers that request's job.
        if (replayed := request.replay(session, find)) is not None:
            return replayed, True
        refuse_over_limit(active=active, limit=limit)
    queue = queue or services.settings.default_queue

    def create() -> Job:
        return repository.create_job(
            session, tenant_id=tenant_id, spec=body, dataset_id=dataset_id, queue=queue, kind=kind
        )

    job, raced = request.commit(session, create=create, resource_id=lambda job: job.id, find=find)
    if raced:  # a concurrent request with this key committed first: its job, already enqueued
        return job, True
    if send_committed(enqueue_job, services.celery, queue=queue, job_id=job.id):
        logger.info("%s job %s queued on %r for tenant %s", kind, job.id, queue, tenant_id)
    return job, False


def check_training_spec(services: Services, spec: JobSpec) -> JobSpec:
    """What ``POST /jobs`` checks in the spec alone (the filter group's size, a built-in model's name); the spec
    with the operator's hardness scorer filled in."""
    if (problem := spec.filter_group_problem()) is not None:
        raise ApiError(400, "filter_group_too_small", problem, param="hyperparameters.filter_scope")
    check_model_name(spec.model)
    return with_service_scorer(services, spec)


def check_training_references(session: Session, services: Services, *, tenant_id: str, spec: JobSpec) -> None:
    """What ``POST /jobs`` checks of what the spec names: datasets of this tenant and of the right kind, a source
    of hardness, the starting adapter, tracking targets."""
    dataset = check_dataset(session, tenant_id=tenant_id, dataset_id=spec.dataset_id, param="dataset_id")
    check_hardness_source(services, spec, dataset)
    check_init_adapter(session, services.artifacts, tenant_id=tenant_id, spec=spec)
    _check_tracking_targets(services, spec)
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


def create_training_job(
    session: Session, services: Services, *, tenant_id: str, spec: JobSpec, idempotency_key: str | None
) -> tuple[Job, bool]:
    """``POST /jobs``: check the spec and every id it names, and that the job fits the workers' GPUs (with
    DAMA_WORKER_GPU_MEMORY_GB), then :func:`submit_job`."""
    spec = check_training_spec(services, spec)
    body, queue = spec.model_dump(mode="json"), spec.queue or services.settings.default_queue

    def check() -> None:
        check_training_references(session, services, tenant_id=tenant_id, spec=spec)

    def fits() -> None:
        # Seconds of waiting for a worker: first every cheap refusal (so no worker counts for a job refused anyway),
        # then no lock, transaction or connection is held while it waits; submit_job checks again under its locks.
        if services.settings.worker_gpu_memory_gb is None:
            return
        check_room(session, services, tenant_id=tenant_id, kind=repository.TRAINING)
        if (limit := services.settings.max_active_jobs) is not None:
            refuse_over_limit(active=repository.active_job_count(session, tenant_id=tenant_id), limit=limit)
        check()
        # Ends the checks' share locks. A commit, not a rollback: a spent Idempotency-Key the replay forgot stays
        # forgotten (brought back, it would make this request's own key a conflict).
        session.commit()
        estimates.refuse_unfit(session, services, tenant_id=tenant_id, spec=body, queue=queue)

    return submit_job(
        session,
        services,
        tenant_id=tenant_id,
        body=body,
        kind=repository.TRAINING,
        endpoint=TRAINING_ENDPOINT,
        dataset_id=spec.dataset_id,
        queue=spec.queue,
        idempotency_key=idempotency_key,
        check=check,
        precheck=fits,
    )


def estimate_training_job(
    session: Session, services: Services, *, tenant_id: str, spec: JobSpec, wait_s: float | None
) -> JobEstimate:
    """``POST /jobs/estimate``: every check of ``POST /jobs`` on the spec and what it names (not the account's
    storage, active-job limit or idempotency: nothing is queued), then an estimate on a worker of the job's queue,
    waited for up to ``wait_s`` (at most DAMA_ESTIMATE_WAIT_S, its default); 400 ``estimate_failed`` when it failed
    on the spec, data or model."""
    spec = check_training_spec(services, spec)
    refuse_remote_code(services, trust_remote_code=spec.trust_remote_code)
    check_training_references(session, services, tenant_id=tenant_id, spec=spec)
    session.rollback()  # the checks' share locks on the datasets are not held while the worker counts
    limit = services.settings.estimate_wait_s
    estimate = estimates.request_estimate(
        session,
        services,
        tenant_id=tenant_id,
        spec=spec.model_dump(mode="json"),
        queue=spec.queue or services.settings.default_queue,
        wait_s=limit if wait_s is None else min(wait_s, limit),
    )
    estimates.refuse_user_error(estimate)
    return estimate


def cancel(session: Session, *, tenant_id: str, job_id: str, kind: str = repository.TRAINING) -> Job:
    """Cancel (queued) or ask to cancel (running) the tenant's job and commit; 409 when it already ended. The
    repository locks the row first, so a worker claiming it right now waits and then finds it cancelled."""
    job = get_tenant_job(session, tenant_id=tenant_id, job_id=job_id, kind=kind)
    noun = "job" if kind == repository.TRAINING else kind
    try:
        repository.request_cancel(session, job=job)
        loops.status_changed(session, run=job)  # a queued run of a loop is cancelled at once: so is its loop
    except IllegalTransition as error:
        raise ApiError(
            409,
            f"{noun}_not_cancellable",
            f"the {noun} already ended ({job.status}); only queued or running {noun}s can be cancelled",
        ) from error
    session.commit()
    return job


def list_jobs(
    session: Session, *, tenant_id: str, kind: str, status: JobStatus | None, limit: int, after: str | None
) -> tuple[list[Job], bool]:
    """A page of the tenant's jobs of ``kind`` (optionally in one status), newest first."""
    found = status.value if status is not None else None
    return repository.list_jobs(session, tenant_id=tenant_id, kind=kind, limit=limit, after=after, status=found)
