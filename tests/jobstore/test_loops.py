"""A loop's mechanics in the job store, on Postgres and SQLite: each run's final status advances the loop in the
same transaction (next stage queued, with the right spec), a stage is never started twice, a failed or cancelled
run ends the loop, cancelling reaches the current run, metrics land per round, the sweeper never takes a loop."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from jobstore import loops, repository
from jobstore.db import session_scope
from jobstore.models import Job, LoopStage, WebhookDelivery, WebhookEndpoint, utcnow
from jobstore.spec import LoopCreate
from jobstore.webhook_store import create_endpoint

QUEUE = "gpu"


def _dataset(factory: sessionmaker[Session], tenant_id: str, name: str) -> str:
    with session_scope(factory) as session:
        dataset = repository.create_dataset(
            session,
            dataset_id=f"ds_{name}_{secrets.token_hex(4)}",
            tenant_id=tenant_id,
            name=name,
            format="generative",
            row_count=8,
            image_count=8,
            size_bytes=1,
            sha256="0" * 64,
            path=name,
            report={"ok": True},
        )
        return dataset.id


def _spec(factory: sessionmaker[Session], tenant_id: str, **values: Any) -> LoopCreate:
    body = {
        "model": "dama/tiny-llava",
        "generative_dataset_id": _dataset(factory, tenant_id, "scenes"),
        "held_out_dataset_id": _dataset(factory, tenant_id, "held"),
        "rounds": 2,
        "sampling": {"samples_per_prompt": 4, "seed": 7},
        "training": {"method": "dama", "hyperparameters": {"max_steps": 3, "batch_size": 4}},
        "evaluation": {"max_samples": 16},
        "queue": QUEUE,
        **values,
    }
    return LoopCreate.model_validate(body)


def _tenant(factory: sessionmaker[Session]) -> str:
    with session_scope(factory) as session:
        tenant = repository.get_or_create_tenant(session, name=f"loops-{secrets.token_hex(4)}")
        create_endpoint(session, tenant_id=tenant.id, url="https://example.com/hook")
        return tenant.id


def _loop(factory: sessionmaker[Session], tenant_id: str, spec: LoopCreate) -> tuple[str, list[tuple[str, str]]]:
    with session_scope(factory) as session:
        loop = loops.create_loop(session, tenant_id=tenant_id, spec=spec)
        created = session.info.pop(loops.CREATED_RUNS)
        return loop.id, created


def _finish(factory: sessionmaker[Session], run_id: str, status: str, **outcome: Any) -> list[tuple[str, str]]:
    """Claim ``run_id`` and record ``status`` as a worker would; the runs that started with it."""
    with session_scope(factory) as session:
        job = repository.claim_job(session, job_id=run_id, worker="w:1")
        assert job is not None
        repository.set_status(session, job=job, status=status, **outcome)
        loops.status_changed(session, run=job)
        return list(session.info.pop(loops.CREATED_RUNS, []))


def _stages(factory: sessionmaker[Session], loop_id: str) -> dict[tuple[int, str], Job]:
    with session_scope(factory) as session:
        runs = loops.stage_runs(session, loop_id=loop_id)
        session.expunge_all()
        return runs


def _evaluation_result(chair_i: float) -> dict[str, Any]:
    pope = {"random": {"f1": 0.8}, "popular": {"f1": 0.7}}
    return {
        "results": {
            "generative": {
                "samples": 16,
                "base": {"chair_i": 0.3, "chair_s": 0.5, "coverage": 0.7, "hallucination_rate": 0.5},
                "tuned": {"chair_i": chair_i, "chair_s": 0.4, "coverage": 0.75, "hallucination_rate": 0.4},
                "pope": {"base": pope, "tuned": {"random": {"f1": 0.9}, "popular": {"f1": 0.8}}},
            }
        }
    }


def test_a_two_round_loop_advances_on_each_success_with_each_stage_once(factory: sessionmaker[Session]) -> None:
    tenant_id = _tenant(factory)
    spec = _spec(factory, tenant_id, init_adapter="job_start")
    pairs1, pairs2 = _dataset(factory, tenant_id, "pairs1"), _dataset(factory, tenant_id, "pairs2")
    loop_id, created = _loop(factory, tenant_id, spec)
    ((first_id, queue),) = created
    assert queue == QUEUE
    runs = _stages(factory, loop_id)
    assert list(runs) == [(1, "pairs")]
    first = runs[(1, "pairs")]
    assert first.id == first_id and first.kind == "pair_generation" and first.status == "queued"
    assert first.spec["init_adapter"] == "job_start" and first.spec["seed"] == 7
    assert first.spec["generative_dataset_id"] == spec.generative_dataset_id and first.spec["samples_per_prompt"] == 4

    # Round 1: pairs -> training on the pairs' dataset, from the loop's start -> evaluation of that job.
    ((training_id, _),) = _finish(factory, first_id, "succeeded", result={"dataset_id": pairs1, "report": {}})
    training = _stages(factory, loop_id)[(1, "training")]
    assert training.id == training_id and training.kind == "training" and training.dataset_id == pairs1
    assert training.spec["init_adapter"] == "job_start" and training.spec["hyperparameters"]["max_steps"] == 3
    ((evaluation_id, _),) = _finish(factory, training_id, "succeeded", result={"steps": 3})
    evaluation = _stages(factory, loop_id)[(1, "evaluation")]
    assert (
        evaluation.spec["adapter_job_id"] == training_id
        and evaluation.spec["generative_dataset_id"] == spec.held_out_dataset_id
    )
    assert evaluation.spec["max_samples"] == 16

    # Round 2 samples from round 1's adapter and trains it further.
    ((pairs2_id, _),) = _finish(factory, evaluation_id, "succeeded", result=_evaluation_result(0.2))
    sampling2 = _stages(factory, loop_id)[(2, "pairs")]
    assert sampling2.id == pairs2_id and sampling2.spec["init_adapter"] == training_id and sampling2.spec["seed"] == 7

    # Starting a stage that exists is a no-op (a second recording of the same success).
    with session_scope(factory) as session:
        loop = session.get(Job, loop_id)
        assert loop is not None
        assert loops.start_stage(session, loop=loop, spec=spec, round_=2, stage="pairs") is None
        assert session.scalar(select(func.count()).select_from(LoopStage).where(LoopStage.loop_id == loop_id)) == 4

    ((training2_id, _),) = _finish(factory, pairs2_id, "succeeded", result={"dataset_id": pairs2, "report": {}})
    assert _stages(factory, loop_id)[(2, "training")].spec["init_adapter"] == training_id
    ((evaluation2_id, _),) = _finish(factory, training2_id, "succeeded", result={"steps": 3})
    assert _finish(factory, evaluation2_id, "succeeded", result=_evaluation_result(0.1)) == []

    with session_scope(factory) as session:
        loop = session.get(Job, loop_id)
        assert loop is not None
        assert (loop.status, loop.step, loop.total_steps, loop.progress) == ("succeeded", 6, 6, 1.0)
        rounds = loop.result["rounds"]
        assert [entry["round"] for entry in rounds] == [1, 2]
        assert [entry["tuned"]["chair_i"] for entry in rounds] == [0.2, 0.1]
        assert rounds[1]["tuned"]["pope_f1"] == pytest.approx(0.85)
        assert rounds[1]["tuned"]["pope_f1_by_split"] == {"random": 0.9, "popular": 0.8}
        assert loop.result["base"]["chair_i"] == 0.3 and loop.result["base"]["pope_f1"] == pytest.approx(0.75)
        events = repository.list_events(session, job_id=loop_id, after_seq=0, limit=100)[0]
        queued = [event.data["run_id"] for event in events if event.type == "stage" and event.data]
        assert len(queued) == len(set(queued)) == 6
        assert [event.data["round"] for event in events if event.type == "round" and event.data] == [1, 2]
        hooks = list(
            session.scalars(
                select(WebhookDelivery.event_type)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(WebhookEndpoint.tenant_id == tenant_id)  # this test's tenant: the database is the session's
                .order_by(WebhookDelivery.created_at)
            )
        )
        loop_hooks = [hook for hook in hooks if hook.startswith("loop.")]
        assert loop_hooks == ["loop.running", "loop.round_completed", "loop.round_completed", "loop.succeeded"]


def test_a_failed_run_fails_the_loop_with_its_reason_and_nothing_more_starts(factory: sessionmaker[Session]) -> None:
    tenant_id = _tenant(factory)
    loop_id, created = _loop(factory, tenant_id, _spec(factory, tenant_id))
    ((first_id, _),) = created
    pairs = _dataset(factory, tenant_id, "pairs")
    ((training_id, _),) = _finish(factory, first_id, "succeeded", result={"dataset_id": pairs, "report": {}})
    kind = repository.ErrorKind.user_error
    assert _finish(factory, training_id, "failed", error_kind=kind, error_message="row 3: too long") == []
    with session_scope(factory) as session:
        loop = session.get(Job, loop_id)
        assert loop is not None and loop.status == "failed" and loop.error_kind == "user_error"
        assert loop.error_message == f"round 1's training job {training_id} failed: row 3: too long"
    assert len(_stages(factory, loop_id)) == 2


def test_cancelling_a_loop_cancels_its_queued_run_at_once(factory: sessionmaker[Session]) -> None:
    tenant_id = _tenant(factory)
    loop_id, _created = _loop(factory, tenant_id, _spec(factory, tenant_id))
    with session_scope(factory) as session:
        loop = session.get(Job, loop_id)
        assert loop is not None
        loops.cancel_loop(session, loop=loop)
    with session_scope(factory) as session:
        loop = session.get(Job, loop_id)
        assert loop is not None and loop.status == "cancelled"
    assert _stages(factory, loop_id)[(1, "pairs")].status == "cancelled"


def test_cancelling_a_loop_while_its_run_runs_ends_it_when_the_run_stops(factory: sessionmaker[Session]) -> None:
    tenant_id = _tenant(factory)
    loop_id, created = _loop(factory, tenant_id, _spec(factory, tenant_id))
    ((first_id, _),) = created
    with session_scope(factory) as session:
        assert repository.claim_job(session, job_id=first_id, worker="w:1") is not None
    with session_scope(factory) as session:
        loop = session.get(Job, loop_id)
        assert loop is not None
        loops.cancel_loop(session, loop=loop)
        assert loop.status == "cancelling"
    assert _stages(factory, loop_id)[(1, "pairs")].status == "cancelling"
    with session_scope(factory) as session:
        run = session.get(Job, first_id)
        assert run is not None
        # The run finished its last batch as the cancel came: the loop still ends, and starts nothing more.
        repository.set_status(session, job=run, status="succeeded", result={"dataset_id": "ds_x", "report": {}})
        loops.status_changed(session, run=run)
        assert session.info.pop(loops.CREATED_RUNS, []) == []
    with session_scope(factory) as session:
        loop = session.get(Job, loop_id)
        assert loop is not None and loop.status == "cancelled"


def test_a_loop_is_never_stale_nor_counted_as_an_active_job(factory: sessionmaker[Session]) -> None:
    tenant_id = _tenant(factory)
    loop_id, _created = _loop(factory, tenant_id, _spec(factory, tenant_id))
    with session_scope(factory) as session:
        loop = session.get(Job, loop_id)
        assert loop is not None
        loop.started_at = utcnow() - timedelta(hours=2)  # as old as can be, and no heartbeat
        session.flush()
        assert loop_id not in repository.stale_jobs(session, older_than=utcnow())
        assert repository.active_job_count(session, tenant_id=tenant_id) == 1  # its pair generation only


def test_a_stage_that_cannot_be_built_fails_the_loop_and_keeps_the_runs_success(factory: sessionmaker[Session]) -> None:
    """A fault in building the next stage is no reason to roll back the run's outcome (it would be redone, and fail
    the same way, until its attempts ran out): the run's success commits and the loop fails saying why."""
    tenant_id = _tenant(factory)
    loop_id, created = _loop(factory, tenant_id, _spec(factory, tenant_id))
    ((first_id, _),) = created
    assert _finish(factory, first_id, "succeeded", result={"report": {}}) == []  # no dataset_id: round 1 can't train
    with session_scope(factory) as session:
        run, loop = session.get(Job, first_id), session.get(Job, loop_id)
        assert run is not None and run.status == "succeeded"
        assert loop is not None and (loop.status, loop.error_kind) == ("failed", "system_error")
        assert loop.error_message == (
            f"after round 1's pair generation {first_id} succeeded, round 1's training job could not be started: "
            "KeyError: 'dataset_id'"
        )
