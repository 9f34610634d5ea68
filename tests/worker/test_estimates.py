"""The estimate task as a plain function (``worker.estimates.run_estimate``) on the real job store and artifact store:
it records the engine's figures once (a duplicate message claims nothing), measured against what the row names,
leaves nothing staged behind, records nothing for an estimate given up on while it ran, fails rather than runs a
stale one (whose message expires too), and stores the engine's advice in the job spec's field names."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.signals import before_task_publish
from sqlalchemy import update

from jobstore import estimates
from jobstore.broker import ESTIMATE_TASK, enqueue_estimate
from jobstore.db import session_scope
from jobstore.models import JobEstimate, utcnow
from jobstore.spec import JobSpec
from jobstore.states import ErrorKind
from tests.worker.conftest import JobStore, tiny_spec
from worker.estimates import in_spec_terms, run_estimate, training_only


def _create(store: JobStore, spec: dict[str, Any], *, memory: float | None = None, kind: str | None = None) -> str:
    with session_scope(store.factory) as session:
        row = estimates.create_estimate(
            session, tenant_id=store.tenant_id, spec=spec, queue="unused", gpu_memory_gib=memory, gpu_kind=kind
        )
        return row.id


def _row(store: JobStore, estimate_id: str) -> JobEstimate:
    with session_scope(store.factory) as session:
        row = estimates.get_estimate(session, estimate_id=estimate_id)
        assert row is not None
        return row


def test_an_estimate_is_made_once_against_what_its_row_names(store: JobStore) -> None:
    estimate_id = _create(store, tiny_spec(store.dataset(8), max_steps=4), memory=1000.0, kind="H100")
    assert run_estimate(estimate_id, session_factory=store.factory, settings=store.settings) == "succeeded"
    assert run_estimate(estimate_id, session_factory=store.factory, settings=store.settings) is None  # a duplicate
    row = _row(store, estimate_id)
    assert row.status == "succeeded" and row.started_at is not None and row.finished_at is not None
    assert row.result is not None and row.error_kind is None
    assert row.result["steps"] == 4 and row.result["rows"] == 8 and row.result["fits"] is True
    assert row.result["gpu_memory_gib"] == 1000.0 and row.result["time"]["gpu_kind"] == "H100"
    assert not store.artifacts.job_dir(estimate_id).exists()  # nothing staged for the job it would be is left


def test_a_spec_the_job_store_cannot_read_fails_as_a_user_error(store: JobStore) -> None:
    estimate_id = _create(store, {"model": "dama/tiny-llava", "dataset_id": store.dataset(8), "lora": {"r": 0}})
    assert run_estimate(estimate_id, session_factory=store.factory, settings=store.settings) == "failed"
    row = _row(store, estimate_id)
    assert row.error_kind == ErrorKind.user_error.value and row.result is None
    assert row.error_message is not None and row.error_message.startswith("invalid job spec:")


def test_an_estimate_given_up_on_while_it_ran_records_nothing(store: JobStore) -> None:
    estimate_id = _create(store, tiny_spec(store.dataset(8)))
    with session_scope(store.factory) as session:
        assert estimates.claim_estimate(session, estimate_id=estimate_id, timeout_s=600) is not None  # a worker took it
        session.execute(
            update(JobEstimate).where(JobEstimate.id == estimate_id).values(created_at=utcnow() - timedelta(hours=1))
        )
    with session_scope(store.factory) as session:
        row = estimates.get_estimate(session, estimate_id=estimate_id)
        assert row is not None
        given_up = estimates.expire_estimate(session, estimate=row, timeout_s=600)
        assert given_up.status == "failed" and given_up.error_kind == ErrorKind.system_error.value
        assert "did not finish it within 600 s" in (given_up.error_message or "")
    with session_scope(store.factory) as session:  # the worker's late outcome is not written over it
        assert not estimates.finish_estimate(session, estimate_id=estimate_id, result={"steps": 1})
    assert _row(store, estimate_id).result is None
    # and a redelivered message for it finds it ended: nothing runs
    assert run_estimate(estimate_id, session_factory=store.factory, settings=store.settings) is None


def test_a_stale_queued_estimate_nobody_read_is_failed_not_run(store: JobStore) -> None:
    # Asked for an hour ago (over DAMA_ESTIMATE_TIMEOUT_S), never read since, and only now reaching a worker: whoever
    # asked has had their answer without it (POST /jobs accepted the job), so the worker must not spend time on it.
    estimate_id = _create(store, tiny_spec(store.dataset(8)))
    with session_scope(store.factory) as session:
        session.execute(
            update(JobEstimate).where(JobEstimate.id == estimate_id).values(created_at=utcnow() - timedelta(hours=1))
        )
    assert run_estimate(estimate_id, session_factory=store.factory, settings=store.settings) is None
    row = _row(store, estimate_id)
    assert row.status == "failed" and row.started_at is None and row.result is None
    assert row.error_kind == ErrorKind.system_error.value
    assert f"no worker of queue 'unused' took this estimate within {store.settings.estimate_timeout_s:.0f} s" in (
        row.error_message or ""
    )
    assert not store.artifacts.job_dir(estimate_id).exists()  # nothing was staged


def test_the_advice_the_worker_stores_names_the_job_specs_fields(store: JobStore) -> None:
    # Measured against far more memory first, then against memory between the job's peak and the smallest
    # alternative's: the engine then advises settings that fit, which it names by its own config paths.
    spec = tiny_spec(store.dataset(8), max_steps=4)
    roomy = _create(store, spec, memory=1000.0)
    assert run_estimate(roomy, session_factory=store.factory, settings=store.settings) == "succeeded"
    figures = _row(store, roomy).result
    assert figures is not None
    peak, smallest = figures["memory"]["peak_gib"], min(option["peak_gib"] for option in figures["options"])
    assert smallest < peak, figures["options"]
    tight = _create(store, spec, memory=(peak + smallest) / 2)
    assert run_estimate(tight, session_factory=store.factory, settings=store.settings) == "succeeded"
    advice = (_row(store, tight).result or {})["advice"]
    assert advice and not any(item.startswith("no setting tried fits") for item in advice), advice
    text = " ".join(advice)
    assert "hyperparameters.gradient_checkpointing on" in text, advice
    assert "optim." not in text and "distributed." not in text, advice


@pytest.mark.parametrize(
    ("engine", "spec"),
    [
        (
            "halve the micro-batch: optim.batch_size 4 with optim.grad_accumulation x2 keeps the same pairs per step, "
            "with optim.gradient_checkpointing on (21.3 GiB per GPU)",
            "halve the micro-batch: hyperparameters.batch_size 4 with hyperparameters.grad_accumulation x2 keeps the "
            "same pairs per step, with hyperparameters.gradient_checkpointing on (21.3 GiB per GPU)",
        ),
        (
            "turn optim.gradient_checkpointing on, about 30% slower (19.4 GiB per GPU)",
            "turn hyperparameters.gradient_checkpointing on, about 30% slower (19.4 GiB per GPU)",
        ),
        (
            "shard over more GPUs: gpus 4 with distributed.strategy fsdp and optim.gradient_checkpointing on "
            "(12.1 GiB per GPU)",
            "shard over more GPUs: gpus 4 with strategy fsdp and hyperparameters.gradient_checkpointing on "
            "(12.1 GiB per GPU)",
        ),
        (
            "no setting tried fits 8.0 GiB: use GPUs with more memory, a smaller model, a lower data.max_length or "
            "data.max_pixels, or LoRA instead of a full fine-tune",
            "no setting tried fits 8.0 GiB: use GPUs with more memory, a smaller model, a lower "
            "hyperparameters.max_length or hyperparameters.max_pixels, or LoRA instead of a full fine-tune",
        ),
    ],
)
def test_the_engines_advice_is_put_in_the_job_specs_terms(engine: str, spec: str) -> None:
    # The engine's sentences (dama_engine.training.estimate._advice), as it writes them.
    assert in_spec_terms(engine) == spec


def test_only_the_training_data_is_staged_for_an_estimate(store: JobStore) -> None:
    job = JobSpec.model_validate(
        {**tiny_spec(store.dataset(8)), "evaluation": {"dataset_id": "ds_heldout", "generative_dataset_id": "ds_gen"}}
    )
    trimmed = training_only(job)
    assert trimmed.evaluation is not None
    assert (trimmed.evaluation.dataset_id, trimmed.evaluation.generative_dataset_id) == (None, None)
    assert trimmed.dataset_id == job.dataset_id and trimmed.hyperparameters == job.hyperparameters
    holdout = JobSpec.model_validate({**tiny_spec(store.dataset(8)), "evaluation": {"holdout_fraction": 0.25}})
    assert training_only(holdout) == holdout  # a held-out share takes rows out of training: it stays


def test_the_estimates_message_expires_when_it_is_given_up_on() -> None:
    # A worker that reaches the message later drops it unrun (Celery's expires); claim_estimate covers the rest.
    app = Celery(broker="memory://")
    published: list[dict[str, Any]] = []

    def sent(headers: dict[str, Any] | None = None, **_: Any) -> None:
        published.append(headers or {})

    before_task_publish.connect(sent)
    try:
        asked = utcnow()
        enqueue_estimate(app, estimate_id="est_test", queue="unused", expires_s=600.0)
    finally:
        before_task_publish.disconnect(sent)
    assert [header["task"] for header in published] == [ESTIMATE_TASK]
    expires = datetime.fromisoformat(published[0]["expires"])
    assert timedelta(seconds=599) < expires - asked < timedelta(seconds=601)
