"""The Celery app both sides build from the settings: the API sends tasks by name, workers run them.

Acknowledgement: **early ack + heartbeats + a sweeper**, not late ack. A fine-tuning job runs for hours or days;
late ack would need a broker visibility timeout longer than any job (Redis re-delivers unacked messages after it),
so a crashed worker's job would wait that long, and a long job could be delivered twice. Instead the message is
acked when a worker takes it, the worker heartbeats into the job store, and the sweeper re-queues a job whose
heartbeat went silent (resuming from its last checkpoint). Postgres, not Redis, is the source of truth: losing the
broker loses no job (the sweeper also re-sends queued jobs nobody claimed). Which job a message starts is decided
in the job store too, fairly across tenants (:func:`enqueue_job`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from jobstore.settings import Settings

RUN_JOB_TASK = "dama.run_job"
SWEEP_TASK = "dama.sweep"
EXPORT_TASK = "dama.export"
ESTIMATE_TASK = "dama.estimate"


def make_celery(settings: Settings) -> Celery:
    app = Celery("dama", broker=settings.resolved_broker_url, set_as_current=False)
    conf: dict[str, Any] = {
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,  # one job at a time per GPU worker
        "task_default_queue": settings.default_queue,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if settings.resolved_broker_url.startswith("filesystem://"):
        # The embedded default: messages are files in one folder that the API and the worker share.
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # else kombu writes ./control in the working directory
            "store_processed": False,
        }
    app.conf.update(conf)
    return app


def enqueue_job(app: Celery, *, job_id: str, queue: str) -> None:
    """Tell the workers of ``queue`` that a job may be ready there. The message does not say "run ``job_id``": the
    worker that takes it claims whichever queued job of ``queue`` fair share puts first
    (:func:`jobstore.repository.claim_next_job`), so every queued job has a message out and a duplicate or late
    one claims nothing. ``job_id`` rides along for the worker's log."""
    app.send_task(RUN_JOB_TASK, args=[job_id], kwargs={"queue": queue}, queue=queue)


def enqueue_export(app: Celery, *, export_id: str, queue: str) -> None:
    """A merged export runs on the queue of its training job: those workers hold its base model."""
    app.send_task(EXPORT_TASK, args=[export_id], queue=queue)


def enqueue_estimate(app: Celery, *, estimate_id: str, queue: str, expires_s: float) -> None:
    """A job estimate runs on the queue of the job it estimates: those workers hold its model, and are the GPUs it is
    measured against. Seconds of work on no GPU, taken between jobs (one at a time per worker, as jobs are). The
    message expires ``expires_s`` after it is sent (DAMA_ESTIMATE_TIMEOUT_S): by then the estimate has been given
    up on, and a worker drops it unrun."""
    app.send_task(ESTIMATE_TASK, args=[estimate_id], queue=queue, expires=expires_s)
