"""Running one job, top to bottom: claim, build the engine config, train, package the adapter, record the outcome.

:func:`run_job` (one given job) and :func:`run_next_job` (the job fair share puts next on a queue) are plain
functions (tests call them directly); :func:`register_tasks` wraps :func:`run_next_job`, and the sweeper, as thin
Celery tasks: a job message means "a job may be ready on this queue", and the worker claims the queued job that
:func:`jobstore.repository.claim_next_job` chooses, fairly across tenants. The task table (``jobs``) is the
product's own: Celery carries only queue names and job ids, and nothing a task writes to the job store can crash
the task (progress writes are kept and retried, see :mod:`worker.progress`). A run that ends while the job store
is unreachable waits for it (``DAMA_STORE_WAIT_S``, with backoff, heartbeating on), then delivers its pending
metrics and events and records its outcome, so a database outage does not make finished work be redone; only past
that wait is the run left to go stale and be recovered by the sweeper.

Outcomes:

* success -> the adapter folder is packed into ``ArtifactStore.adapter_archive(job_id)`` (a flat tar.gz: it
  extracts into a folder ``peft.PeftModel.from_pretrained`` loads), published to the artifact store with the run's
  files, registered with its sha256, and the job ``succeeded`` with its final metrics in ``result``;
* cancel requested -> the engine stops at the next step boundary, stage change or progress report, and any other
  work (building or loading a model) is interrupted within seconds (:mod:`worker.cancel`) -> ``cancelled``;
* worker shutting down (SIGTERM) -> the engine checkpoints and stops -> the job goes back to ``queued`` and the
  sweeper sends it again; it resumes from that checkpoint;
* bad input (data, config, dataset files, model name) -> ``failed`` with ``user_error`` and the engine's message;
* anything else -> ``failed`` with ``system_error`` and a shortened traceback. Nothing is retried blindly: the
  only retry is of the claim itself when the job store is unreachable (a known temporary error).

Artifacts (:mod:`jobstore.artifacts`): with an S3 store the run works in this worker's scratch folder
(:mod:`worker.scratch`): the job's datasets are staged there, a re-run first downloads the newest complete
checkpoint, each checkpoint is uploaded as it is written (manifest last), and the outputs before the outcome.

Storage (``DAMA_TENANT_STORAGE_BYTES``, :mod:`jobstore.quota`): a run does not start while its tenant's storage
is full (``failed``, ``user_error`` naming the setting). Whenever a run ends, the bytes under the job's folder are
recorded in ``jobs.storage_bytes``; a run that would succeed but whose files push the tenant over its quota
fails instead (``user_error`` naming the setting) and its files are removed, so the quota stays true.

Evaluation jobs (``job.kind == "evaluation"``, :func:`_run_evaluation`) run
:func:`dama_engine.evaluation.run_evaluation` instead of training: stages ``validating``, ``loading_model``,
``scoring``, ``log_probs``, ``generating``, ``writing``; on success the results go in ``result["results"]`` and the
per-sample generations, the per-pair scores and the chart are registered as artifacts (``eval_outputs``,
``eval_pairs``, ``eval_chart``). Errors, cancellation and shutdown are handled as for training.

Pair generations (``job.kind == "pair_generation"``, :func:`_run_pair_generation`) run
:func:`dama_engine.pairs.generate_pairs`: stages ``validating``, ``listing_objects`` (with a judge: its host
resolved and checked once, then one request per image), ``loading_model``, ``generating`` (step = prompts done),
``writing``. On success the pairs are moved into the dataset store (:mod:`worker.pair_dataset`) and their
dataset row is created in the transaction that records the success (and counted against the tenant's storage
there): a run that dies first leaves no dataset. The per-sample file, the report and its chart are artifacts
(``pairs_samples``, ``pairs_report``, ``pairs_chart``); ``result`` holds ``dataset_id`` and the report. No prompt
yielding a pair is the engine's ``NoPairsError``: ``failed`` with ``user_error`` and its message.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from celery import Celery, Task
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dama_engine.availability import unavailable_reason
from dama_engine.callbacks import CallbackList
from dama_engine.config import ConfigError
from dama_engine.errors import UserError
from dama_engine.evaluation import EvaluationResult, run_evaluation
from dama_engine.events import EventRelay
from dama_engine.pairs import PairGenerationResult, generate_pairs
from dama_engine.training import TrainResult, checkpoint_step, latest_checkpoint, train
from jobstore import loops, quota, repository
from jobstore.artifacts import ArtifactStore, FilesystemStore, file_sha256, open_store, pack_folder
from jobstore.broker import RUN_JOB_TASK, SWEEP_TASK, enqueue_job
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.loops import CREATED_RUNS
from jobstore.models import Job
from jobstore.settings import Settings
from jobstore.spec import EvaluationCreate, JobSpec, PairGenerationCreate
from jobstore.states import ErrorKind, JobStatus
from worker.cancel import CancelWatch
from worker.distributed import run_distributed
from worker.engine_config import (
    AdapterMissing,
    DatasetMissing,
    build_train_config,
    builtin_model_unbuilt,
    evaluation_config,
    evaluation_passes,
    pairs_config,
    pairs_output_dir,
    stage_evaluation_inputs,
    stage_pair_inputs,
)
from worker.pair_dataset import NewDataset, pair_dataset_id, redact_report, store_pair_dataset
from worker.progress import (
    EvaluationReporter,
    Heartbeat,
    JobReporter,
    JobStopped,
    PairGenerationReporter,
    RunOwner,
    StallWatchdog,
    deep_json_safe,
    json_safe,
    write_until,
)
from worker.scratch import Scratch
from worker.sweeper import StoreWatch, sweep
from worker.tracking import Tracking, make_tracking

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
CLAIM_RETRIES = 5
USER_ERRORS = (UserError, DatasetMissing, AdapterMissing, ValidationError)
EVALUATION, PAIR_GENERATION = repository.EVALUATION, repository.PAIR_GENERATION
# Artifact kinds of an evaluation job: the EvaluationResult path each comes from.
EVALUATION_ARTIFACTS = {"eval_outputs": "generations_path", "eval_pairs": "pairs_path", "eval_chart": "chart_path"}
# Artifact kinds of a pair generation: the PairOutput path each comes from (the dataset becomes a dataset row).
PAIR_ARTIFACTS = {"pairs_samples": "samples_path", "pairs_report": "report_path", "pairs_chart": "chart_path"}
# (tenant_id, kind, recorded path, sha256, size_bytes) of a file to register with the job's outcome (the path as
# ArtifactStore.recorded_path names it).
ArtifactRecord = tuple[str, str, str, str, int]
# Sends a queued run's message: (run id, queue). The worker's: jobstore.broker.enqueue_job on its Celery app.
Sender = Callable[[str, str], None]
# Stages in which a failing model load means a wrong model name, revision or kind (the processor loads in
# "validating", the weights in "loading_model").
MODEL_STAGES = (None, "validating", "loading_model")
# The worker's own stage before the engine's: building a built-in base model on first use.
BUILDING_MODEL = "building_model"


class JobStoreUnavailable(RuntimeError):
    """The job could not be claimed because the job store is unreachable (temporary: the task retries)."""


# Celery's own retry of a claim the job store could not take (the only temporary error retried): 5, 10, 20, 40,
# 60 s apart, then the message is dropped and the sweeper sends the still-queued run again.
CLAIM_RETRY: dict[str, Any] = {
    "autoretry_for": (JobStoreUnavailable,),
    "max_retries": CLAIM_RETRIES,
    "retry_backoff": 5,
    "retry_backoff_max": 60,
    "retry_jitter": False,
}


@dataclass
class WorkerContext:
    """What the worker process builds once from its settings and shares between tasks and the sweeper."""

    settings: Settings
    session_factory: sessionmaker[Session]
    shutdown: threading.Event = field(default_factory=threading.Event)
    store_watch: StoreWatch = field(default_factory=StoreWatch)  # job-store outages, as the sweep task sees them

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        return cls(settings=settings, session_factory=make_session_factory(make_engine(settings.resolved_database_url)))


@dataclass(frozen=True)
class _Claimed:
    job_id: str
    tenant_id: str
    spec: dict[str, Any]
    attempt: int
    dataset_format: str | None
    resume_step: int
    kind: str = repository.TRAINING
    tenant_name: str = ""  # the tracking namespace (worker.tracking)


@dataclass(frozen=True)
class StorageAccount:
    """Where a job's files are and its tenant's quota: the outcome's recording measures the one against the other."""

    folder: Path
    tenant_id: str
    quota_bytes: int | None
    store: ArtifactStore = field(default_factory=lambda: FilesystemStore(Path.cwd()))  # where ``folder`` is kept


STALL_EXIT_CODE = 75  # EX_TEMPFAIL: the supervisor (Compose's restart policy) starts a fresh worker


def exit_stalled_worker(idle_s: float) -> None:
    """End this worker process at once: its run is hung (a CUDA call or a collective that never returns cannot be
    interrupted from Python). torchrun children die with it (PR_SET_PDEATHSIG); the sweeper re-queues the job."""
    log.critical("no progress for %.0f s: exiting with status %d so a fresh worker takes over", idle_s, STALL_EXIT_CODE)
    logging.shutdown()
    os._exit(STALL_EXIT_CODE)


def worker_name(hostname: str | None = None) -> str:
    return f"{hostname or socket.gethostname()}:{os.getpid()}"[:200]


def run_job(
    job_id: str,
    *,
    session_factory: sessionmaker[Session],
    settings: Settings,
    worker: str | None = None,
    shutdown: threading.Event | None = None,
    on_stall: Callable[[float], None] | None = None,
) -> str | None:
    """Run job ``job_id`` to its end on this worker; return its final status, or None if this call did nothing
    (the job was not ``queued``: it ran already, another worker claimed it, or it was cancelled).

    With ``settings.stall_timeout_s``, a run whose engine reports nothing for that long is treated as hung:
    ``on_stall`` (default :func:`exit_stalled_worker`) runs from the heartbeat thread (see
    :class:`worker.progress.Heartbeat`)."""
    worker = worker or worker_name()
    store, scratch = _workspace(settings)
    claimed = _claim(
        lambda session: repository.claim_job(session, job_id=job_id, worker=worker),
        session_factory=session_factory,
        store=store,
        what=f"job {job_id}",
    )
    if claimed is None:
        log.info("job %s is not queued; nothing to do (a duplicate or late message)", job_id)
        return None
    return _run(
        claimed,
        worker,
        session_factory=session_factory,
        settings=settings,
        store=store,
        scratch=scratch,
        shutdown=shutdown,
        on_stall=on_stall,
    )


def _workspace(settings: Settings) -> tuple[ArtifactStore, Scratch]:
    """The artifact store (its local side in this worker's scratch folder) and the scratch cache, evicted to make
    room for the next job's files before it holds any."""
    store = open_store(settings, local_root=settings.resolved_scratch_dir)
    scratch = Scratch(settings.resolved_scratch_dir, max_bytes=settings.scratch_max_bytes)
    scratch.evict()
    return store, scratch


def run_next_job(
    queue: str | None,
    *,
    hint: str | None = None,
    session_factory: sessionmaker[Session],
    settings: Settings,
    worker: str | None = None,
    shutdown: threading.Event | None = None,
    send: Sender | None = None,
) -> str | None:
    """What a job message asks of a worker (fair share, see README "Fair share"): claim the queued job of ``queue``
    that :func:`jobstore.repository.claim_next_job` puts first, whoever's message this is, and run it to its end.
    Returns its final status, or None if nothing was queued there (the job the message was sent for ran already
    under another message, or was cancelled: a duplicate, late or surplus message is a no-op).

    ``hint`` is the job whose submission (or re-queue) sent the message: named in the log, and its queue is used
    for a message that names none (sent before fair share)."""
    worker = worker or worker_name()
    store, scratch = _workspace(settings)

    def pick(session: Session) -> Job | None:
        where = queue
        if where is None:
            hinted = repository.get_job(session, job_id=hint) if hint is not None else None
            if hinted is None:
                return None
            where = hinted.queue
        return repository.claim_next_job(session, queue=where, worker=worker)

    started = time.perf_counter()
    claimed = _claim(pick, session_factory=session_factory, store=store, what=f"the next job of queue {queue}")
    took_ms = 1000 * (time.perf_counter() - started)
    if claimed is None:
        log.info("queue %s: no job queued (message for job %s; %.1f ms); nothing to do", queue, hint, took_ms)
        return None
    log.info(
        "queue %s: claimed job %s of tenant %s in %.1f ms (message for job %s)",
        queue,
        claimed.job_id,
        claimed.tenant_id,
        took_ms,
        hint,
    )
    return _run(
        claimed,
        worker,
        session_factory=session_factory,
        settings=settings,
        store=store,
        scratch=scratch,
        shutdown=shutdown,
        send=send,
    )


def _run(
    claimed: _Claimed,
    worker: str,
    *,
    session_factory: sessionmaker[Session],
    settings: Settings,
    store: ArtifactStore,
    scratch: Scratch,
    shutdown: threading.Event | None,
    on_stall: Callable[[float], None] | None = None,
    send: Sender | None = None,
) -> str | None:
    """Run a claimed job to its end: reporter, heartbeat, stall watchdog, storage check, engine, outcome."""
    job_id = claimed.job_id
    owner = RunOwner(job_id=job_id, worker=worker, attempt=claimed.attempt)
    log.info("job %s: attempt %d on %s", job_id, claimed.attempt, worker)
    common: dict[str, Any] = {
        "owner": owner,
        "session_factory": session_factory,
        "flush_interval_s": settings.metrics_flush_s,
        "shutdown": shutdown,
        "spool_dir": store.job_dir(job_id),  # where reports go past the in-memory bound during an outage
    }
    if store.remote:
        common["artifacts"] = store
    reporter: JobReporter = JobReporter(**common)
    if claimed.kind == EVALUATION:
        reporter = EvaluationReporter(passes=evaluation_passes(claimed.spec), **common)
    elif claimed.kind == PAIR_GENERATION:
        reporter = PairGenerationReporter(listing=bool(claimed.spec.get("judge")), **common)
    watchdog = None
    if settings.stall_timeout_s is not None:
        watchdog = StallWatchdog(
            idle_s=reporter.idle_s, timeout_s=settings.stall_timeout_s, on_stall=on_stall or exit_stalled_worker
        )
    heartbeat = Heartbeat(
        owner=owner, session_factory=session_factory, interval_s=settings.heartbeat_interval_s, watchdog=watchdog
    )
    # Until the outcome is stored: packing a large adapter takes a while, and so may waiting out a database outage
    # (a run that has finished must keep its job alive meanwhile, or the sweeper would have it redone).
    heartbeat.start()
    storage = StorageAccount(store.job_dir(job_id), claimed.tenant_id, settings.tenant_storage_bytes, store)
    recorder = _Recorder(
        owner=owner,
        reporter=reporter,
        session_factory=session_factory,
        wait_s=settings.store_wait_s,
        storage=storage,
        send=send,
    )
    try:
        if full := _storage_full(claimed, session_factory, settings):
            log.warning("job %s: not started, its tenant's storage is full", job_id)
            return recorder.finish(JobStatus.failed, error_kind=ErrorKind.user_error, error_message=full)
        with scratch.hold(_held_paths(claimed, store, scratch)):
            if claimed.kind == EVALUATION:
                return _run_evaluation(claimed, recorder, store=store, settings=settings)
            if claimed.kind == PAIR_GENERATION:
                return _run_pair_generation(claimed, recorder, store=store, settings=settings)
            return _run_claimed(claimed, recorder, store=store, settings=settings)
    finally:
        heartbeat.stop()
        _release_memory()
        scratch.evict()


def _held_paths(claimed: _Claimed, store: ArtifactStore, scratch: Scratch) -> list[Path]:
    """What a running job keeps from eviction: its datasets, its folder, the model and engine caches."""
    datasets = [store.dataset_dir(value) for key, value in _spec_items(claimed.spec) if key.endswith("dataset_id")]
    return [*datasets, store.job_dir(claimed.job_id), scratch.root / "cache", scratch.root / "models"]


def _spec_items(spec: Any) -> list[tuple[str, Any]]:
    """Every (key, value) of a nested spec whose value is a string."""
    if isinstance(spec, dict):
        found = [(k, v) for k, v in spec.items() if isinstance(v, str)]
        return found + [item for value in spec.values() for item in _spec_items(value)]
    return []


def _run_claimed(claimed: _Claimed, recorder: _Recorder, *, store: ArtifactStore, settings: Settings) -> str | None:
    reporter, job_id = recorder.reporter, claimed.job_id
    spec: JobSpec | None = None
    tracking: Tracking | None = None
    try:
        spec = JobSpec.model_validate(claimed.spec)
        tracking = make_tracking(
            spec,
            settings.tracking_targets,
            tenant=claimed.tenant_name,
            job_id=job_id,
            folder=store.job_dir(job_id) / "tracking",
            note=reporter.note,
        )
        with recorder.cancel_watch().armed():
            result = _train(spec, claimed, reporter, store=store, settings=settings, tracking=tracking)
    except JobStopped:
        result = None
    except Exception as error:
        if reporter.stop_reason == "cancelled":  # interrupted, and wrapped on its way out (e.g. in an OSError)
            log.info("job %s: cancelled (%s on the way out)", job_id, type(error).__name__)
            result = None
        else:
            return _failed(recorder, error, run=f"job {job_id}", tracking=tracking, model=spec.model if spec else None)

    if result is None or result.stopped:
        if tracking is not None:
            tracking.finish("cancelled")
        return recorder.stopped()
    try:
        archive = store.adapter_archive(job_id)
        assert result.adapter_dir is not None
        pack_folder(result.adapter_dir, archive)
        sha256, size = file_sha256(archive), archive.stat().st_size
        # The adapter, its archive and the run's metrics; the checkpoints went up as they were written.
        store.publish(store.job_dir(job_id), skip=("run/checkpoints",))
    except Exception as error:
        kind, message = ErrorKind.system_error, short_traceback(error)
        return recorder.finish(JobStatus.failed, error_kind=kind, error_message=message)
    summary = {
        "steps": result.steps,
        "total_steps": result.total_steps,
        "train_metrics": json_safe(result.train_metrics),
        # A resumed run gets its before-training numbers back from the engine (it reads them from metrics.jsonl).
        "eval_before": json_safe(result.eval_before) if result.eval_before else None,
        "eval_after": json_safe(result.eval_after) if result.eval_after else None,
        "evaluation": deep_json_safe(result.evaluation) if result.evaluation is not None else None,
        "adapter_sha256": sha256,
        "adapter_size_bytes": size,
        "seconds": round(result.seconds, 3),
        "attempts": claimed.attempt,
    }
    if tracking is not None:
        tracking.finish("succeeded", adapter=result.adapter_dir, results=summary)
    return recorder.finish(
        JobStatus.succeeded,
        message=f"succeeded after {result.steps} steps; adapter sha256 {sha256}",
        result=summary,
        artifacts=[(claimed.tenant_id, "adapter", store.recorded_path(archive), sha256, size)],
    )


def _run_evaluation(claimed: _Claimed, recorder: _Recorder, *, store: ArtifactStore, settings: Settings) -> str | None:
    """An evaluation job: base (and tuned) model scored on its datasets; results and output files recorded."""
    reporter = recorder.reporter
    spec: EvaluationCreate | None = None
    outcome: EvaluationResult | None = None
    try:
        spec = EvaluationCreate.model_validate(claimed.spec)
        with recorder.cancel_watch().armed():  # staging may build a built-in model: a minute without reports
            _announce_build(spec.model, reporter, settings)
            staged = stage_evaluation_inputs(spec, store=store, settings=settings)
            config = evaluation_config(
                spec, staged, run_dir=store.run_dir(claimed.job_id), preference_format=claimed.dataset_format
            )
            outcome = run_evaluation(config, reporter)
    except JobStopped:
        outcome = None
    except Exception as error:
        if reporter.stop_reason != "cancelled":
            return _failed(recorder, error, run=f"evaluation {claimed.job_id}", model=spec.model if spec else None)
        outcome = None  # interrupted, and wrapped on its way out
    if outcome is None:
        return recorder.stopped()
    try:
        artifacts = _artifact_records(claimed.tenant_id, store, outcome, EVALUATION_ARTIFACTS)
        store.publish(store.job_dir(claimed.job_id))  # the outputs, the chart
    except Exception as error:
        message = short_traceback(error)
        return recorder.finish(JobStatus.failed, error_kind=ErrorKind.system_error, error_message=message)
    summary = {
        "results": deep_json_safe(outcome.results),
        "outputs": {kind: Path(path).name for _, kind, path, _, _ in artifacts},
        "seconds": round(outcome.seconds, 3),
        "attempts": claimed.attempt,
    }
    return recorder.finish(
        JobStatus.succeeded,
        message=f"evaluation succeeded in {outcome.seconds:.1f} s",
        result=summary,
        artifacts=artifacts,
    )


def _run_pair_generation(
    claimed: _Claimed, recorder: _Recorder, *, store: ArtifactStore, settings: Settings
) -> str | None:
    """A pair generation: answers sampled and judged, pairs written; the dataset recorded with the success."""
    reporter, job_id = recorder.reporter, claimed.job_id
    spec: PairGenerationCreate | None = None
    outcome: PairGenerationResult | None = None
    try:
        spec = PairGenerationCreate.model_validate(claimed.spec)
        with recorder.cancel_watch().armed():  # staging may build a built-in model: a minute without reports
            _announce_build(spec.model, reporter, settings)
            staged = stage_pair_inputs(spec, job_id=job_id, store=store, settings=settings)
            output_dir = pairs_output_dir(store, job_id)
            config = pairs_config(spec, staged, output_dir=output_dir)
            outcome = generate_pairs(config, reporter, judge_address=staged.judge_address)
    except JobStopped:
        outcome = None
    except Exception as error:
        if reporter.stop_reason != "cancelled":
            return _failed(recorder, error, run=f"pair generation {job_id}", model=spec.model if spec else None)
        outcome = None  # interrupted, and wrapped on its way out
    if outcome is None or outcome.stopped or outcome.output is None:
        return recorder.stopped()
    assert spec is not None  # validated before the run began
    try:
        output = outcome.output
        dataset = store_pair_dataset(
            output, run_id=job_id, tenant_id=claimed.tenant_id, name=spec.dataset_name, store=store
        )
        report = redact_report(output, outcome.report, spec=claimed.spec)
        artifacts = _artifact_records(claimed.tenant_id, store, output, PAIR_ARTIFACTS)
        store.publish(store.job_dir(job_id))  # the per-sample file, the report, its chart
    except Exception as error:
        message = short_traceback(error)
        store.remove(store.dataset_dir(pair_dataset_id(job_id)))  # files no row will ever name
        return recorder.finish(JobStatus.failed, error_kind=ErrorKind.system_error, error_message=message)
    summary = {
        "dataset_id": dataset.dataset_id,
        "report": deep_json_safe(report),
        "seconds": round(outcome.seconds, 3),
        "attempts": claimed.attempt,
    }
    return recorder.finish(
        JobStatus.succeeded,
        message=f"{outcome.pairs} pairs from {outcome.prompts} prompts: dataset {dataset.dataset_id}",
        result=summary,
        artifacts=artifacts,
        dataset=dataset,
    )


def _artifact_records(
    tenant_id: str, store: ArtifactStore, outcome: Any, kinds: dict[str, str]
) -> list[ArtifactRecord]:
    """The files of a run's ``outcome`` to register: per artifact kind, the outcome's attribute naming the file
    (those it did not write left out)."""
    records: list[ArtifactRecord] = []
    for kind, attribute in kinds.items():
        path: Path | None = getattr(outcome, attribute)
        if path is not None and path.is_file():
            records.append((tenant_id, kind, store.recorded_path(path), file_sha256(path), path.stat().st_size))
    return records


def _failed(
    recorder: _Recorder, error: Exception, *, run: str, model: str | None, tracking: Tracking | None = None
) -> str | None:
    """Record a run the engine (or its setup) failed: ``user_error`` with its message, or ``system_error`` with a
    short traceback (:func:`classify_error`); the whole traceback goes to this worker's log only."""
    kind, message = classify_error(error, stage=recorder.reporter.stage, model=model)
    log.warning("%s failed (%s): %s", run, kind.value, message.splitlines()[0] if message else "", exc_info=error)
    if tracking is not None:
        tracking.finish("failed")
    return recorder.finish(JobStatus.failed, error_kind=kind, error_message=message)


def _claim(
    pick: Callable[[Session], Job | None],
    *,
    session_factory: sessionmaker[Session],
    store: ArtifactStore,
    what: str,
) -> _Claimed | None:
    """Claim a job with ``pick`` (a conditional update in the job store) and read what its run needs, in one
    transaction; None when ``pick`` finds nothing to claim."""
    try:
        with session_scope(session_factory) as session:
            job = pick(session)
            if job is None:
                return None
            job_id = job.id
            resume_step = -1  # nothing to keep: a fresh run logs step 0 (the evaluation before training) again
            if job.attempts > 1:
                # A re-run continues from the newest checkpoint (fetched from the store: the attempt before may
                # have run on another machine); the points it will log again go.
                store.fetch_latest_checkpoint(store.run_dir(job_id))
                checkpoint = latest_checkpoint(store.run_dir(job_id))
                if checkpoint is not None:
                    resume_step = checkpoint_step(checkpoint)
                repository.delete_metrics_after(session, job_id=job_id, step=resume_step)
                repository.record_progress(session, job_id=job_id, step=max(resume_step, 0))
            spec = dict(job.spec)
            # The preference data's format: the training set, or an evaluation job's held-out pairs.
            dataset_id = spec.get("preference_dataset_id") if job.kind == EVALUATION else spec.get("dataset_id")
            return _Claimed(
                job_id=job_id,
                tenant_id=job.tenant_id,
                spec=spec,
                attempt=job.attempts,
                dataset_format=repository.dataset_format(session, dataset_id=dataset_id),
                resume_step=max(resume_step, 0),
                kind=job.kind,
                tenant_name=repository.tenant_name(session, tenant_id=job.tenant_id),
            )
    except OperationalError as error:
        raise JobStoreUnavailable(f"could not claim {what}: {error}") from error


def _train(
    spec: JobSpec,
    claimed: _Claimed,
    reporter: JobReporter,
    *,
    store: ArtifactStore,
    settings: Settings,
    tracking: Tracking | None = None,
) -> TrainResult:
    # Stage (artifact store, built-in models, starting adapter), then translate (a pure function of the spec).
    _announce_build(spec.model, reporter, settings)
    config = build_train_config(
        spec, job_id=claimed.job_id, store=store, settings=settings, dataset_format=claimed.dataset_format
    )
    if spec.gpus > 1:
        _check_gpus(spec.gpus)
        callback = CallbackList([reporter, tracking]) if tracking is not None else reporter
        return run_distributed(config, callback, nproc=spec.gpus, work_dir=store.job_dir(claimed.job_id))
    # The same progress records as under torchrun, delivered in process (dama_engine.events).
    relay = EventRelay(reporter)
    return train(config, CallbackList([relay, tracking]) if tracking is not None else relay)


def _announce_build(model: str, reporter: JobReporter, settings: Settings) -> None:
    """A ``building_model`` stage while this worker builds a built-in base on first use (about a minute for the
    seeing base), so the job does not sit at 'running' with no stage meanwhile."""
    if builtin_model_unbuilt(model, settings):
        reporter.on_stage(BUILDING_MODEL, {"model": model})


def _check_gpus(wanted: int) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # Without any GPU (development, tests) the ranks run on CPU processes; with GPUs, each rank needs its own.
    if 0 < available < wanted:
        raise ConfigError(
            f"gpus: the job asks for {wanted} GPUs but workers on this queue have {available}; "
            "ask for fewer, or send it to a queue whose workers have enough"
        )


@dataclass
class _Recorder:
    """The end of a run: its pending reports delivered, then its outcome recorded, if this attempt still owns the
    job. An unreachable job store is waited for, with backoff, for up to ``wait_s`` seconds in all (the heartbeat
    thread keeps the job alive meanwhile): a run that finished during a database outage is recorded as it ended,
    not re-queued and redone. Past that, the job stays running with a silent heartbeat and the sweeper recovers it."""

    owner: RunOwner
    reporter: JobReporter
    session_factory: sessionmaker[Session]
    wait_s: float
    storage: StorageAccount
    send: Sender | None = None  # sends the message of a run that this outcome started (a loop's next stage)

    def cancel_watch(self) -> CancelWatch:
        """Interrupts the run in any stage once its job is ``cancelling`` (:mod:`worker.cancel`)."""
        return CancelWatch(owner=self.owner, session_factory=self.session_factory, reporter=self.reporter)

    def stopped(self) -> str | None:
        """The engine stopped early: cancelled, re-queued (the worker is shutting down), or lost."""
        deadline = time.monotonic() + self.wait_s
        self.reporter.close(wait_s=self.wait_s)
        reporter = self.reporter
        where = f"at step {reporter.step}" + (f" of {reporter.total_steps}" if reporter.total_steps else "")
        if reporter.stop_reason == "lost":
            return None
        if reporter.stop_reason == "shutdown":
            message = f"the worker is shutting down: re-queued {where}; it resumes from its last checkpoint"
            return self._record(JobStatus.queued, deadline, message=message)
        return self._record(JobStatus.cancelled, deadline, message=f"cancelled {where}")

    def finish(self, status: JobStatus, **outcome: Any) -> str | None:
        deadline = time.monotonic() + self.wait_s
        self.reporter.close(wait_s=self.wait_s)  # metrics and events before the outcome that ends the job
        if self.reporter.stop_reason == "lost":
            return None
        return self._record(status, deadline, **outcome)

    def _record(self, status: JobStatus, deadline: float, **outcome: Any) -> str | None:
        # Past the deadline the job stays running with a silent heartbeat; the sweeper recovers it.
        return write_until(
            deadline,
            lambda: _store_outcome(self.owner, self.session_factory, self.storage, status, send=self.send, **outcome),
            what=f"job {self.owner.job_id}: its outcome ({status.value})",
        )


def _store_outcome(
    owner: RunOwner,
    session_factory: sessionmaker[Session],
    storage: StorageAccount,
    status: JobStatus,
    *,
    message: str | None = None,
    error_kind: ErrorKind | None = None,
    error_message: str | None = None,
    result: dict[str, Any] | None = None,
    artifacts: list[ArtifactRecord] | None = None,
    dataset: NewDataset | None = None,
    send: Sender | None = None,
) -> str | None:
    """Record the run's outcome if this attempt still owns the job; return the job's status then. A ``dataset`` (a
    pair generation's pairs) is created with a success, or its files removed when the success cannot be. A run of
    a loop whose success starts the loop's next stage (same transaction, :mod:`jobstore.loops`): that run's
    message is sent with ``send`` once the outcome committed (without ``send``, or if sending fails, the sweeper
    sends it: a queued run nobody claimed)."""
    created: list[tuple[str, str]] = []
    status_now = _record_outcome(
        owner,
        session_factory,
        storage,
        status,
        created,
        message=message,
        error_kind=error_kind,
        error_message=error_message,
        result=result,
        artifacts=artifacts,
        dataset=dataset,
    )
    for run_id, queue in created:
        if send is None:
            break
        try:
            send(run_id, queue)
        except Exception:
            log.exception(
                "job %s: could not send the message of %s, which it started; the sweeper will", owner.job_id, run_id
            )
    return status_now


def _record_outcome(
    owner: RunOwner,
    session_factory: sessionmaker[Session],
    storage: StorageAccount,
    status: JobStatus,
    created: list[tuple[str, str]],
    *,
    message: str | None,
    error_kind: ErrorKind | None,
    error_message: str | None,
    result: dict[str, Any] | None,
    artifacts: list[ArtifactRecord] | None,
    dataset: NewDataset | None,
) -> str | None:
    """:func:`_store_outcome`'s transaction; ``created`` gets the runs it started, once it committed."""
    with session_scope(session_factory) as session:
        job = repository.lock_owned_job(session, job_id=owner.job_id, worker=owner.worker, attempt=owner.attempt)
        if job is None:
            if _already_recorded(session, owner, status):
                log.info("job %s: outcome %s was stored by a commit that went unheard", owner.job_id, status.value)
                return status.value
            log.warning("job %s: attempt %d lost the job before it ended; leaving it", owner.job_id, owner.attempt)
            return None
        if status == JobStatus.queued and job.status == JobStatus.cancelling.value:
            status, message = JobStatus.cancelled, "cancelled while the worker was shutting down"
        succeeded, adding = status == JobStatus.succeeded, dataset.size_bytes if dataset is not None else 0
        if (over := _account_storage(session, job, storage, succeeded=succeeded, adding=adding)) is not None:
            status, message, error_kind, error_message = JobStatus.failed, None, ErrorKind.user_error, over
            result, artifacts = None, None
        if dataset is not None and status == JobStatus.succeeded:
            repository.create_dataset(session, **dataset.row())
        elif dataset is not None:
            storage.store.remove(dataset.folder)
        for tenant_id, kind, path, sha256, size in artifacts or ():
            repository.add_artifact(
                session,
                tenant_id=tenant_id,
                job_id=owner.job_id,
                kind=kind,
                path=path,
                size_bytes=size,
                sha256=sha256,
            )
        repository.set_status(
            session,
            job=job,
            status=status.value,
            message=message,
            error_kind=error_kind,
            error_message=error_message,
            result=result,
        )
        if status == JobStatus.queued:
            job.worker = None
        loops.status_changed(session, run=job)  # a loop's stage: the loop advances (or ends) with this commit
        recorded = job.status
        started = session.info.pop(CREATED_RUNS, [])
    created.extend(started)  # committed: session_scope's commit raised nothing
    return recorded


def _already_recorded(session: Session, owner: RunOwner, status: JobStatus) -> bool:
    """Whether this attempt's outcome is already in the job store: a retry after a commit whose answer was lost
    finds the job moved on by its own hand (same attempt; re-queuing clears the worker)."""
    row = repository.job_owner(session, job_id=owner.job_id)
    if row is None or row[2] != owner.attempt or row[0] != status.value:
        return False
    return row[1] == (None if status == JobStatus.queued else owner.worker)


def _storage_full(claimed: _Claimed, session_factory: sessionmaker[Session], settings: Settings) -> str | None:
    """The user_error message when the job's tenant has no storage left for a run; None otherwise."""
    what = f"running {claimed.kind} job {claimed.job_id} (it writes checkpoints and outputs)"
    with session_scope(session_factory) as session:
        return quota.full_message(session, tenant_id=claimed.tenant_id, quota=settings.tenant_storage_bytes, what=what)


def _account_storage(
    session: Session, job: Job, storage: StorageAccount, *, succeeded: bool, adding: int = 0
) -> str | None:
    """Record the bytes under the job's folder; when a run about to succeed pushes the tenant over its quota
    (with ``adding`` bytes it stores elsewhere: a pair generation's dataset), remove its files and return the
    user_error message (the run then fails)."""
    if storage.quota_bytes is not None and succeeded:
        quota.lock_tenant(session, tenant_id=storage.tenant_id)  # against a concurrent upload or run ending
    job.storage_bytes = storage.store.size_bytes(storage.folder)
    session.flush()  # before set_status refreshes the row
    if storage.quota_bytes is None or not succeeded:
        return None
    used = quota.tenant_storage_bytes(session, tenant_id=storage.tenant_id) + adding
    if used <= storage.quota_bytes:
        return None
    adding += job.storage_bytes
    storage.store.remove(storage.folder)
    job.storage_bytes = 0
    session.flush()
    message = quota.over_quota_message(
        used=used - adding, adding=adding, quota=storage.quota_bytes, what="this job's files (checkpoints, adapter)"
    )
    return message + "; the job's files were removed"


def classify_error(error: BaseException, *, stage: str | None, model: str | None) -> tuple[ErrorKind, str]:
    """``user_error`` with an actionable message for what the job's input caused, else ``system_error``."""
    if isinstance(error, ValidationError):
        lines = [f"{'.'.join(str(p) for p in item['loc']) or 'spec'}: {item['msg']}" for item in error.errors()]
        return ErrorKind.user_error, _clip("invalid job spec:\n  " + "\n  ".join(lines))
    if isinstance(error, USER_ERRORS):
        message = str(error)
        if "max_length" in message:
            message += "\n(data.max_length is the job spec's hyperparameters.max_length)"
        return ErrorKind.user_error, _clip(message)
    if isinstance(error, torch.OutOfMemoryError):
        return ErrorKind.user_error, _clip(
            f"out of GPU memory during {stage or 'setup'}: lower hyperparameters.batch_size (raise "
            "grad_accumulation to keep the effective batch) or max_length, turn on gradient_checkpointing, "
            f"or use more or larger GPUs (gpus, queue).\n{error}"
        )
    # transformers reports a wrong name, a missing revision or an unreachable hub as OSError(message), without
    # an errno; an OSError with one (disk full, I/O error) is the machine's fault.
    if isinstance(error, OSError) and error.errno is None and stage in MODEL_STAGES:
        return ErrorKind.user_error, _clip(
            f"model {model!r} could not be loaded: {unavailable_reason(error)} (check the name: a hub id or a "
            "folder on the workers)"
        )
    if isinstance(error, ValueError) and stage in ("validating", "loading_model"):
        return ErrorKind.user_error, _clip(
            f"model {model!r} cannot be trained here: {error}\nIt must be an image-text-to-text model of a "
            "supported family (LLaVA, Qwen2-VL, Idefics3 / SmolVLM, ...) with its processor files."
        )
    if isinstance(error, ValueError) and stage == "scoring":
        return ErrorKind.user_error, _clip(f"data hardness: {error}")
    return ErrorKind.system_error, short_traceback(error)


def short_traceback(error: BaseException, *, frames: int = 8) -> str:
    """The error and the innermost ``frames`` frames of its traceback, clipped to fit ``error_message``."""
    head = f"{type(error).__name__}: {error}"
    tail = "".join(traceback.format_exception(error, limit=-frames))
    return _clip(head + "\n\n" + tail, keep_end=True)


def _clip(text: str, *, keep_end: bool = False) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    if keep_end:
        return text[:500] + "\n...\n" + text[-(MAX_ERROR_CHARS - 505) :]
    return text[: MAX_ERROR_CHARS - 4] + "\n..."


def _release_memory() -> None:
    """One worker process runs job after job: hand back what the last one held."""
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        log.debug("could not empty the CUDA cache", exc_info=True)


def register_tasks(app: Celery, context: WorkerContext) -> None:
    """The Celery tasks: thin wrappers that call the plain functions with this worker's context."""

    @app.task(name=RUN_JOB_TASK, bind=True, acks_late=False, ignore_result=True, **CLAIM_RETRY)
    def run_job_task(self: Task, job_id: str, queue: str | None = None) -> None:
        # "A job may be ready on this queue": the worker runs the job fair share puts first (run_next_job).
        run_next_job(
            queue,
            hint=job_id,
            session_factory=context.session_factory,
            settings=context.settings,
            worker=worker_name(self.request.hostname),
            shutdown=context.shutdown,
            send=lambda run_id, run_queue: enqueue_job(app, job_id=run_id, queue=run_queue),
        )

    @app.task(name=SWEEP_TASK, ignore_result=True)
    def sweep_task() -> None:
        sweep(context.session_factory, app, context.settings, context.store_watch)
