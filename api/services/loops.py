"""Loops: rounds of sample -> train -> evaluate on the server (:mod:`jobstore.loops`), created, read and cancelled.

A loop is a job of kind ``loop`` (id ``loop_...``) that no worker claims; its rounds are ordinary runs (pair
generations, training jobs, evaluations) of the tenant, listed under their own routes too. Creating one checks what
every round's runs will need (the datasets, the model, the starting adapter, the operator's limits), records the
loop with round 1's pair generation in one transaction, then sends that run's message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.deps import Services
from api.errors import ApiError
from api.services.idempotency import IdempotentCreate, body_hash
from api.services.jobs import (
    check_dataset,
    check_init_adapter,
    check_model_name,
    check_room,
    get_tenant_job,
    refuse_over_limit,
    refuse_remote_code,
)
from api.services.pair_generations import check_limits
from api.services.sending import send_committed
from jobstore import loops, repository
from jobstore.broker import enqueue_job
from jobstore.models import Job
from jobstore.spec import EvaluationCreate, JobSpec, LoopCreate, PairGenerationCreate
from jobstore.states import IllegalTransition, JobStatus

logger = logging.getLogger(__name__)

ENDPOINT = "POST /loops"
KIND = loops.LOOP


def get_tenant_loop(session: Session, *, tenant_id: str, loop_id: str) -> Job:
    return get_tenant_job(session, tenant_id=tenant_id, job_id=loop_id, kind=KIND)


def _check_spec(session: Session, services: Services, *, tenant_id: str, spec: LoopCreate) -> None:
    """What each round's runs will be checked for by their own endpoints, checked once here, with the loop's
    field names: an error found at round 3 would cost two rounds of compute."""
    settings = services.settings
    if spec.rounds > settings.loops_max_rounds:
        raise ApiError(
            422,
            "rounds_over_limit",
            f"rounds: {spec.rounds} is more than this service allows per loop ({settings.loops_max_rounds}, "
            f"DAMA_LOOPS_MAX_ROUNDS); ask for at most {settings.loops_max_rounds}",
            param="rounds",
        )
    check_model_name(spec.model)
    if spec.generative_dataset_id == spec.held_out_dataset_id:
        raise ApiError(
            422,
            "held_out_is_sampled",
            "held_out_dataset_id: it is the set the rounds sample their pairs from; evaluate on scenes the pairs "
            "never came from (upload a held-out generative set)",
            param="held_out_dataset_id",
        )
    sampled = check_dataset(
        session,
        tenant_id=tenant_id,
        dataset_id=spec.generative_dataset_id,
        param="generative_dataset_id",
        generative=True,
    )
    check_dataset(
        session, tenant_id=tenant_id, dataset_id=spec.held_out_dataset_id, param="held_out_dataset_id", generative=True
    )
    first_pairs = PairGenerationCreate.model_validate(
        {
            "model": spec.model,
            "generative_dataset_id": spec.generative_dataset_id,
            **spec.sampling.model_dump(mode="json"),
        }
    )
    check_limits(settings, first_pairs, sampled, prefix="sampling.")
    training = JobSpec.model_validate(
        {
            "model": spec.model,
            "dataset_id": spec.generative_dataset_id,  # a stand-in: each round's pairs are made by the round
            "init_adapter": spec.init_adapter,
            **spec.training.model_dump(mode="json"),
        }
    )
    if (problem := training.filter_group_problem()) is not None:
        raise ApiError(400, "filter_group_too_small", problem, param="training.hyperparameters.filter_scope")
    if spec.rounds > 1 and not spec.training.lora.enabled:
        raise ApiError(
            422,
            "rounds_need_lora",
            "training.lora.enabled: each round trains the previous round's adapter further, which needs LoRA; "
            "enable it or ask for one round",
            param="training.lora.enabled",
        )
    check_init_adapter(session, services.artifacts, tenant_id=tenant_id, spec=training)
    # The evaluations' spec, as each round will build it (a stand-in for the round's training job).
    EvaluationCreate.model_validate(
        {
            "model": spec.model,
            "adapter_job_id": "job_stand_in",
            "generative_dataset_id": spec.held_out_dataset_id,
            **spec.evaluation.model_dump(mode="json"),
        }
    )


def _refuse_over_limit(session: Session, services: Services, *, tenant_id: str) -> None:
    """429 once the tenant has DAMA_LOOPS_MAX_ACTIVE loops that have not ended, or DAMA_MAX_ACTIVE_JOBS runs (the
    loop's first run would be one more; later stages replace the stage before them, one run at a time)."""
    if (most_runs := services.settings.max_active_jobs) is not None:
        refuse_over_limit(active=repository.active_job_count(session, tenant_id=tenant_id), limit=most_runs)
    limit = services.settings.loops_max_active
    active = loops.active_loop_count(session, tenant_id=tenant_id)
    if active >= limit:
        raise ApiError(
            429,
            "too_many_active_loops",
            f"this account has {active} loops running, the most it may have at once ({limit}, "
            "DAMA_LOOPS_MAX_ACTIVE); wait for one to end or cancel one, then retry",
            headers={"Retry-After": "60"},
        )


def create_loop(
    session: Session, services: Services, *, tenant_id: str, spec: LoopCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """``POST /loops``: check, record the loop and round 1's pair generation, commit, send that run's message;
    (loop, replayed) as for jobs."""
    spec = spec.model_copy(update={"queue": spec.queue or services.settings.default_queue})
    body = spec.model_dump(mode="json")
    request = IdempotentCreate(
        tenant_id=tenant_id, endpoint=ENDPOINT, key=idempotency_key, request_hash=body_hash(body), what="loop spec"
    )

    def find(loop_id: str) -> Job | None:
        return repository.get_job(session, job_id=loop_id, tenant_id=tenant_id, kind=KIND)

    if (replayed := request.replay(session, find)) is not None:
        return replayed, True
    refuse_remote_code(services, trust_remote_code=spec.trust_remote_code)
    _check_spec(session, services, tenant_id=tenant_id, spec=spec)
    check_room(session, services, tenant_id=tenant_id, kind="loop")
    _refuse_over_limit(session, services, tenant_id=tenant_id)
    if (replayed := request.replay(session, find)) is not None:  # a retry that waited behind its first request
        return replayed, True
    loop, raced = request.commit(
        session,
        create=lambda: loops.create_loop(session, tenant_id=tenant_id, spec=spec),
        resource_id=lambda loop: loop.id,
        find=find,
    )
    created = session.info.pop(loops.CREATED_RUNS, [])
    if raced:
        return loop, True
    send_created(services, created)
    logger.info("loop %s of %d rounds for tenant %s", loop.id, spec.rounds, tenant_id)
    return loop, False


def send_created(services: Services, created: list[tuple[str, str]]) -> None:
    """Send the messages of runs a committed transaction created for loops (the sweeper sends what fails)."""
    for run_id, queue in created:
        send_committed(enqueue_job, services.celery, queue=queue, job_id=run_id)


def cancel(session: Session, services: Services, *, tenant_id: str, loop_id: str) -> Job:
    """Cancel the loop and its current run, commit; 409 once it ended."""
    loop = get_tenant_loop(session, tenant_id=tenant_id, loop_id=loop_id)
    try:
        loops.cancel_loop(session, loop=loop)
    except IllegalTransition as error:
        raise ApiError(
            409, "loop_not_cancellable", f"the loop already ended ({loop.status}); only running loops can be cancelled"
        ) from error
    session.commit()
    session.info.pop(loops.CREATED_RUNS, None)
    return loop


@dataclass(frozen=True)
class RoundView:
    """One round as the API shows it: its runs (id, status, progress) and, once evaluated, its metrics."""

    round: int
    runs: dict[str, Job]
    metrics: dict[str, Any] | None


def rounds(session: Session, *, loop: Job) -> list[RoundView]:
    """Every round of the loop, those not started yet included (with no runs)."""
    spec = LoopCreate.model_validate(loop.spec)
    runs = loops.stage_runs(session, loop_id=loop.id)
    measured = {entry["round"]: entry for entry in (loop.result or {}).get("rounds", [])}
    return [
        RoundView(
            round=number,
            runs={stage: runs[(number, stage)] for stage in loops.STAGES if (number, stage) in runs},
            metrics=measured.get(number),
        )
        for number in range(1, spec.rounds + 1)
    ]


def progress(loop: Job, views: list[RoundView]) -> float:
    """Stages done plus the running stage's own share, over all stages; 1 once the loop succeeded."""
    if loop.status == JobStatus.succeeded.value:
        return 1.0
    total = max(loop.total_steps or 1, 1)
    current = [run for view in views for run in view.runs.values() if run.status in repository.RUNNING]
    share = current[0].progress if current else 0.0
    return min((loop.step + share) / total, 1.0)
