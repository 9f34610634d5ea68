"""A real Celery worker process (``celery -A worker.celery_app worker --pool solo``) on real Redis and Postgres.

The tests run in order on one worker: a job to success (with the adapter loaded by peft), a cancel mid-training,
then a SIGKILL mid-training, after which a new worker's sweeper re-queues the job and it resumes from its
checkpoint to success.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from celery import Celery

from jobstore import repository
from jobstore.artifacts import file_sha256
from jobstore.broker import enqueue_job, make_celery
from jobstore.db import session_scope
from jobstore.states import STAGES
from tests.worker.conftest import QUEUE_PREFIX, JobStore, WorkerProcess, tiny_spec, wait_for
from worker.engine_config import ensure_tiny_model, model_cache_root

pytestmark = pytest.mark.slow

QUEUE = f"{QUEUE_PREFIX}-worker"
TERMINAL = ("succeeded", "failed", "cancelled")


class Workers:
    """The module's current worker process; ``replace`` starts a new one after the old one died."""

    def __init__(self, store: JobStore, log_dir: Path) -> None:
        self.store, self.log_dir, self.count = store, log_dir, 0
        self.current = self._start()

    def _start(self) -> WorkerProcess:
        self.count += 1
        return WorkerProcess(self.store.settings, QUEUE, self.log_dir, f"w{self.count}")

    def replace(self) -> WorkerProcess:
        self.current = self._start()
        return self.current


@pytest.fixture(scope="module")
def workers(store: JobStore, worker_log_dir: Path) -> Iterator[Workers]:
    pool = Workers(store, worker_log_dir)
    yield pool
    pool.current.stop()


@pytest.fixture(scope="module")
def app(store: JobStore) -> Iterator[Celery]:
    celery_app = make_celery(store.settings)
    yield celery_app
    celery_app.close()


def _submit(
    store: JobStore, app: Celery, evaluation: dict[str, object] | None = None, **hyperparameters: object
) -> str:
    spec = tiny_spec(store.dataset(48), **hyperparameters)
    if evaluation is not None:
        spec["evaluation"] = evaluation
    job_id = store.create_job(spec, queue=QUEUE)
    enqueue_job(app, job_id=job_id, queue=QUEUE)
    return job_id


def _wait_terminal(store: JobStore, workers: Workers, job_id: str, timeout: float = 120) -> str:
    try:
        return str(wait_for(lambda: store.job(job_id).status in TERMINAL, timeout=timeout, interval=0.2) and "ok")
    except AssertionError:
        pytest.fail(f"job {job_id} is {store.job(job_id).status}; worker log:\n{workers.current.log()}")


def test_a_job_runs_to_succeeded_on_a_worker(store: JobStore, app: Celery, workers: Workers, tmp_path: Path) -> None:
    job_id = _submit(store, app, {"dataset_id": store.dataset(8)}, max_steps=60, checkpoint_every=10)
    # Metrics arrive in batches while the job trains (not all at the end).
    counts: list[int] = []

    def watch() -> bool:
        job = store.job(job_id)
        if job.status == "running" and job.stage == "training":
            counts.append(len(store.metric_series(job_id).get("loss", [])))
        return job.status in TERMINAL

    try:
        wait_for(watch, timeout=120, interval=0.05)
    except AssertionError:
        pytest.fail(f"job {job_id} is {store.job(job_id).status}; worker log:\n{workers.current.log()}")
    job = store.job(job_id)
    assert job.status == "succeeded", (job.error_message, workers.current.log())
    growing = sorted(set(count for count in counts if 0 < count < 60))
    assert len(growing) >= 2, f"metrics did not grow during training: {counts}"

    assert [stage for stage in STAGES if stage in store.stages(job_id)] == list(STAGES)
    stages = store.stages(job_id)
    assert stages.index("validating") < stages.index("training") < stages.index("exporting")
    # Checkpoints at 10..50; the engine keeps the newest two on disk and the list offers only those.
    assert store.checkpoint_steps(job_id) == [40, 50]
    series = store.metric_series(job_id)
    assert [int(step) for step, _ in series["loss"]] == list(range(1, 61))
    assert [int(step) for step, _ in series["eval_accuracy"]] == [0, 60]  # on the evaluation dataset
    assert job.result is not None and job.result["eval_after"]["eval_pairs"] == 8.0
    assert job.attempts == 1 and job.step == 60 and job.progress == 1.0
    assert job.worker is not None and job.worker.startswith("w1@")

    # The adapter: archived, registered with its sha256, and it loads with peft on the tiny base model.
    archive = store.artifacts.adapter_archive(job_id)
    assert job.result is not None and job.result["adapter_sha256"] == file_sha256(archive)
    with session_scope(store.factory) as session:
        artifact = repository.get_artifact(session, job_id=job_id, kind="adapter")
        assert artifact is not None and artifact.sha256 == file_sha256(archive)
    target = tmp_path / "adapter"
    with tarfile.open(archive) as bundle:
        bundle.extractall(target, filter="data")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(ensure_tiny_model("llava", model_cache_root(store.settings)))
    model = PeftModel.from_pretrained(base, target)
    saved = load_file(target / "adapter_model.safetensors")
    loaded = {name.replace(".default", ""): value for name, value in model.named_parameters()}
    lora = [name for name in saved if ".lora_" in name]
    assert lora, sorted(saved)
    for name in lora:
        assert torch.equal(loaded[name].detach(), saved[name]), name
    assert any(saved[name].abs().sum() > 0 for name in lora if ".lora_B" in name)  # trained: B starts at zero


def test_a_job_cancelled_mid_training_stops_within_a_step_or_two(
    store: JobStore, app: Celery, workers: Workers
) -> None:
    total = 400
    job_id = _submit(store, app, max_steps=total, checkpoint_every=1000)
    wait_for(
        lambda: store.job(job_id).status == "running" and store.job(job_id).step > 0,
        timeout=120,
        interval=0.02,
        what="training to start",
    )
    # The busy worker does not hold the next job's message (no prefetch): it waits in Redis for any free worker.
    waiting = _submit(store, app)
    assert redis.Redis.from_url(store.settings.resolved_broker_url).llen(QUEUE) == 1
    with session_scope(store.factory) as session:
        for cancel in (job_id, waiting):  # running -> cancelling; queued -> cancelled at once
            job = repository.get_job(session, job_id=cancel)
            assert job is not None
            repository.request_cancel(session, job=job)
    cancelled_at = store.job(job_id).step
    _wait_terminal(store, workers, job_id, timeout=60)
    job = store.job(job_id)
    assert job.status == "cancelled", (job.status, job.error_message)
    # The worker polls the status at most every 0.5 s and each step takes tens of ms here: a handful of steps.
    assert job.step < total // 4, (cancelled_at, job.step)
    assert job.result is None and not store.artifacts.adapter_archive(job_id).exists()
    assert any(
        kind == "status" and message.startswith("cancelled at step") for kind, message, _ in store.events(job_id)
    )
    # The waiting job's message reaches the worker next and is a no-op: the job was never claimed.
    wait_for(lambda: redis.Redis.from_url(store.settings.resolved_broker_url).llen(QUEUE) == 0, timeout=30)
    assert (store.job(waiting).status, store.job(waiting).attempts) == ("cancelled", 0)


def test_a_killed_worker_is_recovered_and_the_job_resumes_from_its_checkpoint(
    store: JobStore, app: Celery, workers: Workers
) -> None:
    total = 100
    job_id = _submit(store, app, max_steps=total, checkpoint_every=10)
    wait_for(lambda: store.checkpoint_steps(job_id), timeout=120, interval=0.02, what="a first checkpoint")
    workers.current.kill()
    killed = store.job(job_id)
    assert killed.status == "running" and killed.step < total, "the job finished before the kill"
    first_worker = killed.worker

    workers.replace()  # its sweeper finds the silent run, re-queues it and sends it again; the worker resumes it
    _wait_terminal(store, workers, job_id, timeout=120)
    job = store.job(job_id)
    assert job.status == "succeeded", (job.error_message, workers.current.log())
    assert job.attempts == 2 and job.worker != first_worker
    events = store.events(job_id)
    requeued = [m for kind, m, _ in events if kind == "status" and "stopped responding; re-queued" in m]
    assert requeued and first_worker is not None and first_worker in requeued[0]
    resumed = [data for kind, _, data in events if kind == "resumed"]
    assert resumed and resumed[0] is not None
    resumed_from = resumed[0]["step"]
    assert 10 <= resumed_from < total and resumed_from % 10 == 0
    training = [data for kind, _, data in events if kind == "stage" and data and data["stage"] == "training"]
    assert [data["resumed_from_step"] for data in training] == [0, resumed_from]  # type: ignore[index]
    # Points past the checkpoint were dropped and logged again: each step exactly once.
    assert [int(step) for step, _ in store.metric_series(job_id)["loss"]] == list(range(1, total + 1))


def test_a_worker_shutting_down_checkpoints_and_requeues_its_job(
    store: JobStore, app: Celery, workers: Workers
) -> None:
    total = 400
    job_id = _submit(store, app, max_steps=total, checkpoint_every=1000)
    wait_for(lambda: store.job(job_id).step > 0, timeout=120, interval=0.02, what="training to start")
    workers.current.terminate()  # SIGTERM: Celery's warm shutdown
    workers.current.process.wait(timeout=30)  # it does not wait for the job to finish
    job = store.job(job_id)
    assert job.status == "queued" and job.worker is None and job.step < total
    stopped_at = store.checkpoint_steps(job_id)
    assert stopped_at and 0 < stopped_at[-1] < total  # the step it stopped at, off the every-1000 schedule
    assert any("shutting down: re-queued" in message for _, message, _ in store.events(job_id))
    with session_scope(store.factory) as session:  # not resumed here (the resume is tested above)
        queued = repository.get_job(session, job_id=job_id)
        assert queued is not None
        repository.request_cancel(session, job=queued)
