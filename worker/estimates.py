"""The estimate task: what a job would take (rows, steps, tokens, memory per GPU, wall time, whether it fits), before
it is launched.

The API has no transformers, so the counting runs here, on a worker of the job's queue: the job's engine config is
built as for the job itself (:func:`worker.engine_config.build_train_config`: its training dataset and starting
adapter staged, a built-in model built on first use; not its evaluation sets, which the estimate does not read),
then :func:`dama_engine.training.estimate_training` reads the model's config (on the meta device, no weights) and
processor and measures the rows' token lengths. Seconds of work and no GPU: the worker takes it between jobs, as
it takes jobs (one task at a time). One asked for DAMA_ESTIMATE_TIMEOUT_S ago or more is failed, not run: whoever
asked has had their answer without it.

``run_estimate`` is a plain function (tests call it directly); the Celery task wraps it. Bad input (data, config,
model name) fails the estimate with ``user_error`` and the engine's message, anything else with ``system_error``
(:func:`worker.tasks.classify_error`, as for jobs). Nothing the estimate stages outlives it: the starting adapter's
copy a job would keep in its own folder goes with the estimate's folder.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import Celery
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dama_engine.training import estimate_training
from dama_settings.spec_sources import JOB_SPEC_SOURCES
from jobstore import estimates, repository
from jobstore.artifacts import open_store
from jobstore.broker import ESTIMATE_TASK
from jobstore.db import session_scope
from jobstore.settings import Settings
from jobstore.spec import JobSpec
from jobstore.states import ErrorKind
from worker.engine_config import build_train_config
from worker.progress import deep_json_safe
from worker.tasks import CLAIM_RETRY, JobStoreUnavailable, WorkerContext, classify_error

log = logging.getLogger(__name__)


def run_estimate(estimate_id: str, *, session_factory: sessionmaker[Session], settings: Settings) -> str | None:
    """Make estimate ``estimate_id``; return its final status, or None if it was not queued (a duplicate message,
    or the API gave up on it) or it was given up on while it ran."""
    try:
        with session_scope(session_factory) as session:
            estimate = estimates.claim_estimate(session, estimate_id=estimate_id, timeout_s=settings.estimate_timeout_s)
            if estimate is None:
                log.info("estimate %s is not queued (taken, ended, or given up on now); nothing to do", estimate_id)
                return None
            spec = dict(estimate.spec)
            # What the API asked it to be measured against (its settings, not this worker's): POST /jobs/estimate
            # and the fit check of POST /jobs say the same.
            gpu_memory_gib, gpu_kind = estimate.gpu_memory_gib, estimate.gpu_kind
            dataset_format = repository.dataset_format(session, dataset_id=spec.get("dataset_id"))
    except OperationalError as error:
        raise JobStoreUnavailable(f"could not claim estimate {estimate_id}: {error}") from error
    outcome: dict[str, Any] = {}
    model = spec.get("model")
    store = open_store(settings, local_root=settings.resolved_scratch_dir)
    try:
        job = JobSpec.model_validate(spec)
        config = build_train_config(
            training_only(job), job_id=estimate_id, store=store, settings=settings, dataset_format=dataset_format
        )
        figures = estimate_training(config, world_size=job.gpus, gpu_kind=gpu_kind, gpu_memory_gib=gpu_memory_gib)
        figures["advice"] = [in_spec_terms(str(item)) for item in figures.get("advice") or []]
        outcome["result"] = deep_json_safe(figures)
    except Exception as error:
        kind, message = classify_error(error, stage="validating", model=model if isinstance(model, str) else None)
        log.warning("estimate %s failed (%s): %s", estimate_id, kind.value, message.splitlines()[0], exc_info=error)
        outcome.update(error_kind=kind, error_message=message)
    finally:
        store.remove(store.job_dir(estimate_id))  # what staging copied for the job it would be
    return _record(estimate_id, session_factory, **outcome)


def training_only(job: JobSpec) -> JobSpec:
    """The spec without its held-out and generative datasets: the estimate measures the training rows only, and
    staging those sets would copy data it never reads. A holdout_fraction stays (it takes rows out of training);
    it is 0 whenever a held-out dataset is named."""
    evaluation = job.evaluation
    if evaluation is None or (evaluation.dataset_id is None and evaluation.generative_dataset_id is None):
        return job
    without = evaluation.model_copy(update={"dataset_id": None, "generative_dataset_id": None})
    return job.model_copy(update={"evaluation": without})


def in_spec_terms(text: str) -> str:
    """The engine's config paths in an estimate's advice (``optim.batch_size``) as the job spec names them
    (``hyperparameters.batch_size``), from the one table of where each engine setting comes from."""
    for section, sources in JOB_SPEC_SOURCES.items():
        for name, source in sources.items():
            if isinstance(source, str):
                text = re.sub(rf"(?<![\w.]){re.escape(section)}\.{re.escape(name)}\b", source, text)
    return text


def _record(
    estimate_id: str,
    session_factory: sessionmaker[Session],
    *,
    result: dict[str, Any] | None = None,
    error_kind: ErrorKind | None = None,
    error_message: str | None = None,
) -> str | None:
    """Store the outcome; a failed write is logged, never raised (the API gives up on the estimate in time)."""
    status = estimates.FAILED if error_kind is not None else estimates.SUCCEEDED
    try:
        with session_scope(session_factory) as session:
            recorded = estimates.finish_estimate(
                session, estimate_id=estimate_id, result=result, error_kind=error_kind, error_message=error_message
            )
    except Exception:
        log.exception("estimate %s: could not record its outcome (%s)", estimate_id, status)
        return None
    if not recorded:
        log.warning("estimate %s was given up on before it ended; its outcome is not recorded", estimate_id)
        return None
    log.info("estimate %s %s", estimate_id, status)
    return status


def register_estimate_task(app: Celery, context: WorkerContext) -> None:
    @app.task(name=ESTIMATE_TASK, acks_late=False, ignore_result=True, **CLAIM_RETRY)
    def estimate_task(estimate_id: str) -> None:
        run_estimate(estimate_id, session_factory=context.session_factory, settings=context.settings)
