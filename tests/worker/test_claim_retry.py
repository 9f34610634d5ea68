"""A claim the job store cannot take is retried by Celery itself (``autoretry_for`` with ``retry_backoff``): five
retries, 5 to 60 seconds apart, then the task fails and the sweeper sends the still-queued run again.

The job store here is a Postgres URL whose port nobody listens on (a real refused connection); the tasks run in
Celery's eager mode, which goes through the same retry machinery and reports each retry with the
``task_retry`` signal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.signals import task_retry

from jobstore.broker import EXPORT_TASK, RUN_JOB_TASK, make_celery
from jobstore.settings import Settings
from worker.exports import register_export_task
from worker.tasks import CLAIM_RETRIES, JobStoreUnavailable, WorkerContext, register_tasks


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Celery]:
    """One app for the module: Celery warns when task names are registered twice."""
    settings = Settings(
        home=tmp_path_factory.mktemp("claim-retry"),
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/unreachable",
    )
    celery_app = make_celery(settings)
    celery_app.conf.task_always_eager = True
    context = WorkerContext.from_settings(settings)
    register_tasks(celery_app, context)
    register_export_task(celery_app, context)
    yield celery_app
    celery_app.close()


@pytest.mark.parametrize(("task", "run_id"), [(RUN_JOB_TASK, "job_unclaimable"), (EXPORT_TASK, "exp_unclaimable")])
def test_an_unreachable_job_store_is_retried_with_backoff_then_the_task_fails(
    app: Celery, task: str, run_id: str
) -> None:
    countdowns: list[Any] = []

    def on_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
        if request is not None and request.id == result_id:
            countdowns.append(reason.when)

    result_id = f"probe-{run_id}"
    task_retry.connect(on_retry, weak=False)
    try:
        result = app.tasks[task].apply(args=[run_id], task_id=result_id)
    finally:
        task_retry.disconnect(on_retry)
    assert result.state == "FAILURE" and isinstance(result.result, JobStoreUnavailable)
    assert countdowns == [5, 10, 20, 40, 60][:CLAIM_RETRIES]
