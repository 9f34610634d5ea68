"""Pair generations in the worker (kind ``pair_generation``): run in this process on the built-in random tiny LLaVA,
the pairs become a dataset row of the tenant with the run's success (images once, checked as an upload is), and
no prompt yielding a pair is a user_error; a worker SIGKILLed after the dataset's files are in place but before the
success is recorded leaves no dataset, and the next worker's sweeper re-runs it to exactly one."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from jobstore import repository
from jobstore.broker import enqueue_job, make_celery
from jobstore.db import session_scope
from jobstore.models import Dataset, WebhookDelivery
from jobstore.webhook_store import create_endpoint
from tests.engine.test_pairs import NOUNS, _generative_set
from tests.worker.conftest import QUEUE_PREFIX, JobStore, WorkerProcess, wait_for
from worker.pair_dataset import pair_dataset_id
from worker.tasks import run_job

QUEUE = "in-process"


def generative_dataset(store: JobStore, *, prompts: int, vocabulary: dict[str, list[str]] | None = None) -> str:
    """A generative set laid out as the API stores one (JSONL + vocabulary.json + images), with its row."""
    dataset_id = f"ds_test{secrets.token_hex(8)}"
    folder = store.artifacts.dataset_dir(dataset_id) / "data"
    _generative_set(folder, prompts, vocabulary)
    with session_scope(store.factory) as session:
        repository.create_dataset(
            session,
            dataset_id=dataset_id,
            tenant_id=store.tenant_id,
            name="generative",
            format="generative",
            row_count=prompts,
            image_count=prompts,
            size_bytes=1,
            sha256="0" * 64,
            path=str(folder),
            report={"ok": True},
        )
    return dataset_id


def pair_spec(dataset_id: str, **values: Any) -> dict[str, Any]:
    """Six answers of 24 tokens per prompt, seed 3: the engine's end-to-end settings, which make pairs."""
    spec = {"model": "dama/tiny-llava", "generative_dataset_id": dataset_id, "samples_per_prompt": 6}
    return {**spec, "max_new_tokens": 24, "seed": 3, "prompts_per_batch": 3, **values}


def create_run(store: JobStore, spec: dict[str, Any], *, queue: str = QUEUE) -> str:
    with session_scope(store.factory) as session:
        job = repository.create_job(
            session,
            tenant_id=store.tenant_id,
            spec=spec,
            dataset_id=spec["generative_dataset_id"],
            queue=queue,
            kind=repository.PAIR_GENERATION,
        )
        return job.id


def dataset_row(store: JobStore, dataset_id: str) -> Dataset | None:
    with session_scope(store.factory) as session:
        return repository.get_dataset(session, tenant_id=store.tenant_id, dataset_id=dataset_id)


def _run(store: JobStore, run_id: str) -> str | None:
    return run_job(run_id, session_factory=store.factory, settings=store.settings, worker="pytest:1")


def test_a_pair_generation_registers_its_pairs_as_a_dataset_with_its_success(store: JobStore) -> None:
    with session_scope(store.factory) as session:  # every event type, those added later too ("*")
        create_endpoint(session, tenant_id=store.tenant_id, url="https://hooks.example.com/pairs", event_types=None)
    run_id = create_run(store, pair_spec(generative_dataset(store, prompts=6)))
    assert run_id.startswith("pgen_")
    assert _run(store, run_id) == "succeeded", store.job(run_id).error_message
    job = store.job(run_id)
    assert job.result is not None and job.progress == 1.0 and (job.step, job.total_steps) == (6, 6)
    assert store.stages(run_id) == ["validating", "loading_model", "generating", "writing"]
    report, dataset_id = job.result["report"], job.result["dataset_id"]
    assert dataset_id == pair_dataset_id(run_id) and report["prompts_tried"] == 6 and report["samples"] == 36
    dataset = dataset_row(store, dataset_id)
    assert dataset is not None and dataset.format == "trl" and dataset.row_count == report["pairs"] > 0
    assert dataset.report["ok"] and dataset.report["source"] == {"pair_generation_id": run_id}
    data = store.artifacts.dataset_dir(dataset_id) / "data"
    assert dataset.path == str(data.resolve()) and dataset.size_bytes == sum(
        path.stat().st_size for path in data.rglob("*") if path.is_file()
    )
    assert len(list((data / "images").iterdir())) <= 3  # 3 distinct images behind 6 prompts, each stored once
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    assert {"chosen_score", "rejected_score", "images"} <= set(rows[0])
    # The job's own folder keeps the per-sample file and the report, not a second copy of the dataset.
    with session_scope(store.factory) as session:
        kinds = {kind: repository.get_artifact(session, job_id=run_id, kind=kind) for kind in ("pairs_samples",)}
        samples = kinds["pairs_samples"]
        assert samples is not None and len(Path(samples.path).read_text().splitlines()) == 36
        types = [row.event_type for row in session.query(WebhookDelivery).all() if row.payload["data"]["id"] == run_id]
    assert not (store.artifacts.run_dir(run_id) / "pairs" / "dataset").exists()
    assert job.storage_bytes == sum(
        path.stat().st_size for path in store.artifacts.job_dir(run_id).rglob("*") if path.is_file()
    )
    assert types == ["pair_generation.running", "pair_generation.succeeded"]


def test_no_pair_from_any_prompt_fails_as_a_user_error_and_leaves_no_dataset(store: JobStore) -> None:
    """Objects the random model never names: every sample is faithful."""
    vocabulary = {"red zeppelin": [], "blue walrus": []}
    run_id = create_run(store, pair_spec(generative_dataset(store, prompts=2, vocabulary=vocabulary)))
    assert _run(store, run_id) == "failed"
    job = store.job(run_id)
    assert job.error_kind == "user_error" and (job.error_message or "").startswith(
        "no pairs: 2 prompts tried with 6 samples each"
    )
    assert dataset_row(store, pair_dataset_id(run_id)) is None
    assert not store.artifacts.dataset_dir(pair_dataset_id(run_id)).exists()


def _kill_after_files_stored(app: Celery, store: JobStore, log_dir: Path, queue: str, run_id: str) -> None:
    first = WorkerProcess(store.settings, queue, log_dir, "pairs1", app="tests.worker.kill_before_recording")
    try:
        enqueue_job(app, job_id=run_id, queue=queue)
        wait_for(lambda: first.process.poll() is not None, timeout=120, what="the worker to kill itself")
    finally:
        first.stop()
    assert "killing this worker before the pairs' dataset is recorded" in first.log(), first.log()


@pytest.mark.slow
def test_a_worker_killed_before_the_dataset_is_recorded_leaves_none_and_the_rerun_records_one(
    store: JobStore, worker_log_dir: Path
) -> None:
    queue = f"{QUEUE_PREFIX}-pairs-{secrets.token_hex(3)}"
    run_id = create_run(store, pair_spec(generative_dataset(store, prompts=3)), queue=queue)
    dataset_id = pair_dataset_id(run_id)
    app = make_celery(store.settings)
    try:
        _kill_after_files_stored(app, store, worker_log_dir, queue, run_id)
        killed = store.job(run_id)
        assert killed.status == "running" and killed.attempts == 1
        # The files are all there, yet no dataset: nothing can see or use them.
        assert (store.artifacts.dataset_dir(dataset_id) / "data" / "pairs.jsonl").is_file()
        assert dataset_row(store, dataset_id) is None

        second = WorkerProcess(store.settings, queue, worker_log_dir, "pairs2")  # its sweeper re-queues the run
        try:
            wait_for(lambda: store.job(run_id).status in ("succeeded", "failed"), timeout=120, what="the re-run")
        finally:
            second.stop()
    finally:
        app.close()
    job = store.job(run_id)
    assert job.status == "succeeded" and job.attempts == 2, (job.error_message, second.log())
    dataset = dataset_row(store, dataset_id)
    assert dataset is not None and job.result is not None and job.result["dataset_id"] == dataset_id
    with session_scope(store.factory) as session:
        names = [row.name for row in session.query(Dataset).filter(Dataset.tenant_id == store.tenant_id)]
    assert names.count(f"pairs from {run_id}") == 1
