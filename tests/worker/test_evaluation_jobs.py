"""Evaluation in the worker, in this process: a training job that evaluates on a generative set, and an
evaluation job (kind ``evaluation``) comparing that job's adapter with its base model."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from dama_engine.proving.shapes import make_demo_dataset
from jobstore import repository
from jobstore.db import session_scope
from tests.worker.conftest import JobStore, tiny_spec
from worker.tasks import run_job

QUEUE = "in-process"
CHAIR_KEYS = {"chair_s", "chair_i", "coverage", "hallucination_rate", "mean_length"}


def _run(store: JobStore, job_id: str) -> str | None:
    return run_job(job_id, session_factory=store.factory, settings=store.settings, worker="pytest:1")


def _generative_dataset(store: JobStore) -> str:
    """A generative evaluation set laid out as the API stores one: JSONL + vocabulary.json + images."""
    dataset_id = f"ds_test{secrets.token_hex(8)}"
    folder = store.artifacts.dataset_dir(dataset_id) / "data"
    demo = make_demo_dataset(folder, n_train=0, n_eval=0, n_generative=4, image_size=32)
    demo.train.unlink()
    demo.eval.unlink()
    with session_scope(store.factory) as session:
        repository.create_dataset(
            session,
            dataset_id=dataset_id,
            tenant_id=store.tenant_id,
            name="generative",
            format="generative",
            row_count=4,
            image_count=4,
            size_bytes=1,
            sha256="0" * 64,
            path=str(folder),
            report={"ok": True},
        )
    return dataset_id


@pytest.fixture(scope="module")
def trained_with_generative(store: JobStore) -> tuple[str, str]:
    generative = _generative_dataset(store)
    spec = tiny_spec(store.dataset(48), max_steps=4, checkpoint_every=4)
    spec["evaluation"] = {"generative_dataset_id": generative, "max_new_tokens": 6, "max_samples": 3}
    job_id = store.create_job(spec, queue=QUEUE)
    assert _run(store, job_id) == "succeeded", store.job(job_id).error_message
    return job_id, generative


def test_a_training_job_evaluates_on_a_generative_dataset(
    store: JobStore, trained_with_generative: tuple[str, str]
) -> None:
    job_id, _ = trained_with_generative
    result = store.job(job_id).result
    assert result is not None
    generative = result["evaluation"]["generative"]
    assert generative["samples"] == 3  # evaluation.max_samples of the set's 4
    assert result["evaluation"]["model"] == "dama/tiny-llava"
    assert result["evaluation"]["adapter"] == "this run's dama adapter"
    assert set(generative["base"]) >= CHAIR_KEYS and set(generative["tuned"]) >= CHAIR_KEYS
    assert "evaluating" in store.stages(job_id)
    card = (store.artifacts.run_dir(job_id) / "adapter" / "README.md").read_text()
    assert "Base against tuned" in card and "chair_s" in card


def test_an_evaluation_job_compares_a_training_jobs_adapter_with_its_base(
    store: JobStore, trained_with_generative: tuple[str, str]
) -> None:
    training_id, generative = trained_with_generative
    spec: dict[str, Any] = {
        "model": "dama/tiny-llava",
        "adapter_job_id": training_id,
        "generative_dataset_id": generative,
        "generation": {"max_new_tokens": 6},
        "max_length": 256,
    }
    with session_scope(store.factory) as session:
        job = repository.create_job(
            session, tenant_id=store.tenant_id, spec=spec, dataset_id=generative, queue=QUEUE, kind="evaluation"
        )
        eval_id = job.id
    assert eval_id.startswith("eval_")
    assert _run(store, eval_id) == "succeeded", store.job(eval_id).error_message
    job = store.job(eval_id)
    assert job.progress == 1.0 and job.stage is None  # ended: no current stage
    assert job.result is not None
    results = job.result["results"]
    # The results name the model and the adapter as the tenant knows them, never the workers' folders.
    assert results["model"] == "dama/tiny-llava" and results["adapter"] == f"adapter of {training_id}"
    assert results["preference"] is None
    assert set(results["generative"]["tuned"]) >= CHAIR_KEYS
    stages = store.stages(eval_id)
    assert stages == ["validating", "loading_model", "generating", "generating", "writing"]
    with session_scope(store.factory) as session:
        outputs = repository.get_artifact(session, job_id=eval_id, kind="eval_outputs")
        chart = repository.get_artifact(session, job_id=eval_id, kind="eval_chart")
        assert outputs is not None and chart is not None
        rows = [json.loads(line) for line in Path(outputs.path).read_text().splitlines()]
    assert len(rows) == 4 and {"base", "tuned", "prompt", "objects"} <= set(rows[0])


def test_an_evaluation_of_a_missing_adapter_is_a_user_error(store: JobStore) -> None:
    spec = {"model": "dama/tiny-llava", "adapter_job_id": "job_missing", "preference_dataset_id": store.dataset(48)}
    with session_scope(store.factory) as session:
        job = repository.create_job(
            session, tenant_id=store.tenant_id, spec=spec, dataset_id=None, queue=QUEUE, kind="evaluation"
        )
        eval_id = job.id
    assert _run(store, eval_id) == "failed"
    job = store.job(eval_id)
    assert job.error_kind == "user_error" and "adapter_job_id" in (job.error_message or "")
