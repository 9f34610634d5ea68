"""Fair share end to end: a real Celery worker process (``benchmarks.fake_engine``: the product's worker with a
fake engine that sleeps through a few steps) on real Redis and Postgres.

Tenant A queues 10 jobs, then tenant B queues 1; with one worker, B's job runs second, not eleventh. Two
duplicate messages on top claim nothing: every job runs exactly once. And a message in the format before fair
share (a job id, no queue) still claims, on its job's queue.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from jobstore import repository
from jobstore.broker import enqueue_job, make_celery
from jobstore.db import session_scope
from tests.worker.conftest import QUEUE_PREFIX, JobStore, WorkerProcess, tiny_spec, wait_for

pytestmark = pytest.mark.slow

QUEUE = f"{QUEUE_PREFIX}-fair"


@pytest.fixture(scope="module")
def fake_worker(store: JobStore, worker_log_dir: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        store.settings,
        QUEUE,
        worker_log_dir,
        "fair",
        app="benchmarks.fake_engine",
        env={"FAKE_ENGINE_STEP_S": "0.15"},
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def app(store: JobStore) -> Iterator[Celery]:
    celery_app = make_celery(store.settings)
    yield celery_app
    celery_app.close()


def _submit(store: JobStore, app: Celery, tenant_id: str) -> str:
    spec = tiny_spec(store.dataset(8), max_steps=4)
    with session_scope(store.factory) as session:
        job = repository.create_job(session, tenant_id=tenant_id, spec=spec, dataset_id=spec["dataset_id"], queue=QUEUE)
    enqueue_job(app, job_id=job.id, queue=QUEUE)
    return job.id


def test_a_tenant_behind_another_tenants_ten_jobs_runs_second(
    store: JobStore, app: Celery, fake_worker: WorkerProcess
) -> None:
    with session_scope(store.factory) as session:
        tenant_b = repository.get_or_create_tenant(session, name=f"fair-b-{secrets.token_hex(4)}").id
    a_jobs = [_submit(store, app, store.tenant_id) for _ in range(10)]
    wait_for(lambda: store.job(a_jobs[0]).status == "running", timeout=60, what="A's first job to start")
    b_job = _submit(store, app, tenant_b)
    for duplicate in a_jobs[:2]:  # a redelivered or repeated message: claims the fairest job, or nothing
        enqueue_job(app, job_id=duplicate, queue=QUEUE)

    everything = [*a_jobs, b_job]
    try:
        wait_for(lambda: all(store.job(j).status == "succeeded" for j in everything), timeout=120, interval=0.2)
    except AssertionError:
        pytest.fail(f"{[store.job(j).status for j in everything]}; worker log:\n{fake_worker.log()}")
    jobs = [store.job(job_id) for job_id in everything]
    assert {job.attempts for job in jobs} == {1}  # none ran twice
    started = sorted(jobs, key=lambda job: job.started_at or 0)
    assert [job.id for job in started] == [a_jobs[0], b_job, *a_jobs[1:]], fake_worker.log()
    # The two surplus messages found nothing to claim.
    wait_for(lambda: fake_worker.log().count("no job queued") == 2, timeout=30, what="the surplus messages")


def test_a_message_without_a_queue_claims_on_its_jobs_queue(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message sent before fair share carries only a job id: the worker claims on that job's queue."""
    from dama_engine.training.recipe import TrainResult
    from worker import tasks

    def instant_train(config: Any, callback: Any) -> TrainResult:
        adapter = Path(config.run.output_dir) / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter_config.json").write_text("{}")
        return TrainResult(output_dir=adapter.parent, adapter_dir=adapter, steps=1, total_steps=1, stopped=False)

    monkeypatch.setattr(tasks, "train", instant_train)
    queue = f"{QUEUE_PREFIX}-old-{secrets.token_hex(3)}"  # no worker consumes it
    job_id = store.create_job(tiny_spec(store.dataset(8), max_steps=1), queue=queue)
    common: dict[str, Any] = {"session_factory": store.factory, "settings": store.settings, "worker": "pytest:old"}
    assert tasks.run_next_job(None, hint="job_unknown", **common) is None
    assert tasks.run_next_job(None, hint=job_id, **common) == "succeeded"
    assert tasks.run_next_job(None, hint=job_id, **common) is None  # a repeat finds nothing queued there
    assert store.job(job_id).attempts == 1
