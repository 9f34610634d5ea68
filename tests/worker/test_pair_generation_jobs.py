"""Pair generations in the worker (kind ``pair_generation``) on the built-in random tiny LLaVA: a worker SIGKILLed
after the dataset's files are in place but before the success is recorded leaves no dataset; the sweeper re-queues
the run, and its re-run records exactly one dataset row with the success (images once, checked as an upload is,
counted once), announced to webhooks as ``pair_generation.*``; a run cancelled while it generates stops before a
next batch, leaving no dataset. The HTTP side and the no-pair failure:
tests/api/test_pair_generations.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from dama_engine.callbacks import Callback, CallbackList
from dama_engine.pairs import PairGenerationResult, PairsConfig
from jobstore import repository
from jobstore.broker import make_celery
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import Dataset, WebhookDelivery
from jobstore.settings import Settings
from jobstore.spec import PairGenerationCreate
from jobstore.webhook_store import create_endpoint
from tests.engine.test_pairs import _generative_set
from tests.worker.conftest import QUEUE_PREFIX, JobStore
from worker import tasks
from worker.engine_config import StagedPairs, pairs_config
from worker.pair_dataset import pair_dataset_id
from worker.sweeper import sweep
from worker.tasks import run_job

QUEUE = "in-process"
STORE_PAIR_DATASET = tasks.store_pair_dataset


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


def test_a_request_becomes_the_engine_config() -> None:
    """A pure function of the request and the staged paths: every sampling setting reaches the engine."""
    spec = PairGenerationCreate.model_validate(
        {
            "model": "org/vlm",
            "generative_dataset_id": "ds_x",
            "init_adapter": "job_abc:20",
            "samples_per_prompt": 5,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_new_tokens": 32,
            "seed": 4,
            "max_prompts": 10,
            "prompts_per_batch": 2,
        }
    )
    staged = StagedPairs(None, Path("/s/set.jsonl"), Path("/s/vocabulary.json"), Path("/s/init_adapter"))
    config = pairs_config(spec, staged, output_dir=Path("/runs/pgen_x/run/pairs"))
    assert (config.model.name_or_path, config.model.precision, config.model.init_adapter) == (
        "org/vlm",
        "auto",
        "/s/init_adapter",
    )
    assert (config.data.generative, config.data.vocabulary, config.data.max_prompts) == (
        "/s/set.jsonl",
        "/s/vocabulary.json",
        10,
    )
    generation = config.generation
    assert (generation.temperature, generation.top_p, generation.max_new_tokens, generation.seed) == (0.7, 0.9, 32, 4)
    assert (config.sampling.samples_per_prompt, config.sampling.prompts_per_batch) == (5, 2)
    assert config.output_dir == "/runs/pgen_x/run/pairs"


def test_a_running_pair_generation_cancelled_stops_before_a_next_batch_leaving_no_dataset(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = pair_spec(generative_dataset(store, prompts=6), samples_per_prompt=2, max_new_tokens=8, prompts_per_batch=1)
    run_id = create_run(store, spec)
    engine = tasks.generate_pairs

    class CancelAfterTheFirstBatch(Callback):
        def on_progress(self, stage: str, done: int, total: int) -> None:
            if done == 1:  # as POST /pair-generations/{id}/cancel does
                with session_scope(store.factory) as session:
                    job = repository.get_job(session, job_id=run_id)
                    assert job is not None
                    repository.request_cancel(session, job=job)
                # The reporter reads the status at most every poll_interval_s (0.5 s): the next batches could all
                # end before that on an idle machine; the wait makes its next check read the cancel.
                time.sleep(0.6)

    def cancelled_while_generating(
        config: PairsConfig, reporter: Callback, *, judge_address: str | None = None
    ) -> PairGenerationResult:
        return engine(config, CallbackList([CancelAfterTheFirstBatch(), reporter]), judge_address=judge_address)

    monkeypatch.setattr(tasks, "generate_pairs", cancelled_while_generating)
    assert _run(store, run_id) == "cancelled"
    job = store.job(run_id)
    # an ended run's stage is cleared; its events keep where it stopped
    assert job.stage is None and 1 <= job.step < 6 and job.result is None
    assert store.stages(run_id)[-1] == "generating"
    assert dataset_row(store, pair_dataset_id(run_id)) is None
    assert not store.artifacts.dataset_dir(pair_dataset_id(run_id)).exists()
    assert not (store.artifacts.run_dir(run_id) / "pairs").exists()


def _store_then_die(*args: Any, **kwargs: Any) -> Any:
    """``store_pair_dataset``, then SIGKILL: the dataset's files are in place, its row is not recorded yet."""
    stored = STORE_PAIR_DATASET(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return stored  # never reached


def _run_and_die(settings: Settings, run_id: str) -> None:
    """A worker process (forked from this one, so it starts at once) that runs the pair generation and dies at the
    worst moment; it opens its own connections, never the parent's."""
    tasks.store_pair_dataset = _store_then_die
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    run_job(run_id, session_factory=factory, settings=settings, worker="doomed:1")


def test_a_worker_killed_before_the_dataset_is_recorded_leaves_none_and_the_rerun_records_it(
    store: JobStore,
) -> None:
    with session_scope(store.factory) as session:  # every event type, those added later too ("*")
        endpoint = create_endpoint(session, tenant_id=store.tenant_id, url="https://hooks.example.com/pairs")
        endpoint_id = endpoint.id
    queue = f"{QUEUE_PREFIX}-pairs-{secrets.token_hex(3)}"  # no worker consumes it: the sweeper's message waits
    run_id = create_run(store, pair_spec(generative_dataset(store, prompts=3)), queue=queue)
    dataset_id = pair_dataset_id(run_id)
    doomed = multiprocessing.get_context("fork").Process(target=_run_and_die, args=(store.settings, run_id))
    doomed.start()
    doomed.join(timeout=120)
    assert doomed.exitcode == -signal.SIGKILL, doomed.exitcode
    killed = store.job(run_id)
    assert killed.status == "running" and killed.attempts == 1 and killed.worker == "doomed:1"
    # Every file is there, checked and published, yet there is no dataset: nothing can see or use them.
    assert (store.artifacts.dataset_dir(dataset_id) / "data" / "pairs.jsonl").is_file()
    assert dataset_row(store, dataset_id) is None

    # Recovered as any run whose worker died: the sweeper re-queues it once its heartbeats are overdue.
    settings = store.settings.model_copy(update={"heartbeat_timeout_s": 0.2})
    time.sleep(0.3)
    app = make_celery(settings)
    try:
        assert sweep(store.factory, app, settings)["requeued"] >= 1
    finally:
        app.close()
    assert store.job(run_id).status == "queued"
    assert _run(store, run_id) == "succeeded", store.job(run_id).error_message
    job = store.job(run_id)
    assert job.attempts == 2 and job.result is not None and job.result["dataset_id"] == dataset_id
    assert job.progress == 1.0 and (job.step, job.total_steps) == (3, 3)
    assert store.stages(run_id)[-4:] == ["validating", "loading_model", "generating", "writing"]
    report = job.result["report"]
    assert report["prompts_tried"] == 3 and report["samples"] == 18
    with session_scope(store.factory) as session:
        names = [row.name for row in session.query(Dataset).filter(Dataset.tenant_id == store.tenant_id)]
        deliveries = session.query(WebhookDelivery).filter(WebhookDelivery.endpoint_id == endpoint_id)
        types = [row.event_type for row in deliveries.order_by(WebhookDelivery.created_at)]
    assert names.count(f"pairs from {run_id}") == 1
    assert types == ["pair_generation.running", "pair_generation.running", "pair_generation.succeeded"]

    # One dataset row, with the upload check's report; each image stored once, the bytes counted once.
    dataset = dataset_row(store, dataset_id)
    assert dataset is not None and dataset.format == "trl" and dataset.row_count == report["pairs"] > 0
    assert dataset.report["ok"] and dataset.report["source"] == {"pair_generation_id": run_id}
    data = store.artifacts.dataset_dir(dataset_id) / "data"
    assert dataset.path == str(data.resolve()) and dataset.size_bytes == _bytes(data)
    assert len(list((data / "images").iterdir())) <= 3  # 3 distinct images behind the prompts
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == dataset.row_count and {"chosen_score", "rejected_score", "images"} <= set(rows[0])
    # The run's folder keeps the per-sample file and the report, not a second copy of the dataset.
    assert not (store.artifacts.run_dir(run_id) / "pairs" / "dataset").exists()
    assert job.storage_bytes == _bytes(store.artifacts.job_dir(run_id))
    with session_scope(store.factory) as session:
        samples = repository.get_artifact(session, job_id=run_id, kind="pairs_samples")
        assert samples is not None and len(Path(samples.path).read_text().splitlines()) == 18
        report_file = repository.get_artifact(session, job_id=run_id, kind="pairs_report")
        assert report_file is not None
    # The report the tenant downloads names no file of this worker (the staged set, the built-in model's folder).
    shown = Path(report_file.path).read_text()
    assert json.loads(shown) == report and str(store.settings.home) not in shown
    assert report["generative"].endswith("/generative.jsonl") and report["model"] == "dama/tiny-llava"


def _bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
