"""The worker's entry point: ``celery -A worker.celery_app worker -Q <queue> --pool solo --concurrency 1``.

Settings are read here, once (``DAMA_*`` environment variables). One worker process serves one GPU queue and
runs one job at a time.

Why the **solo pool**: the job runs in the worker process itself. A SIGKILL or an out-of-memory kill of the worker
then ends the training with it, and its heartbeats stop, which is what the sweeper watches (under prefork, killing
the parent can leave a child training on, heartbeating for a job whose worker is gone). Cancellation needs no
pool support: it goes through the job store (the engine polls ``should_stop`` every step), not Celery's revoke.
A warm shutdown (SIGTERM) makes the running job checkpoint, stop and go back to the queue, instead of holding
the shutdown for hours. One process per job queue also keeps CUDA in one process per GPU.

Why the **sweeper runs as a thread here** rather than under Celery beat: see :mod:`worker.sweeper`. The webhook
dispatcher (:mod:`worker.webhooks`) runs beside it, for the same reasons.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from jobstore.broker import make_celery
from jobstore.settings import Settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_app(settings: Settings) -> Celery:
    """The worker's Celery app with its tasks, a sweeper started with the worker, and graceful shutdown."""
    if settings.model_cache_dir is not None:
        # Hub downloads go to the workers' model cache; set before transformers is first imported (below).
        os.environ.setdefault("HF_HOME", str(settings.model_cache_dir))
    from worker.estimates import register_estimate_task
    from worker.exports import register_export_task
    from worker.sweeper import SweeperThread
    from worker.tasks import WorkerContext, register_tasks
    from worker.webhooks import DispatcherThread

    app = make_celery(settings)
    if settings.resolved_broker_url.startswith(("redis://", "rediss://")):
        # A busy worker does not hold the next job's message: an idle worker on the same queue takes it.
        app.conf.worker_disable_prefetch = True
    context = WorkerContext.from_settings(settings)
    register_tasks(app, context)
    register_export_task(app, context)
    register_estimate_task(app, context)
    sweeper = SweeperThread(context.session_factory, app, settings)
    dispatcher = DispatcherThread(context.session_factory, settings)

    def on_ready(**_: Any) -> None:
        sweeper.start()
        dispatcher.start()

    def on_shutting_down(**_: Any) -> None:
        context.shutdown.set()  # the running job checkpoints at its next step and is re-queued

    def on_shutdown(**_: Any) -> None:
        sweeper.stop()
        dispatcher.stop()

    # weak=False: the receivers are closures that would otherwise be garbage-collected at once.
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    return app


app = create_app(Settings())
