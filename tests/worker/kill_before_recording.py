"""The product's worker, SIGKILLed at the worst moment of a pair generation: its dataset's files are all in the
dataset store, checked and published, and the success (with the dataset's row) is not yet recorded.

    celery -A tests.worker.kill_before_recording worker -Q <queue> --pool solo --concurrency 1

Used by tests/worker/test_pair_generation_jobs.py: no dataset may exist after this, and the run is recovered as
any run whose worker died.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from worker import tasks

log = logging.getLogger(__name__)
_store_pair_dataset = tasks.store_pair_dataset


def store_then_die(*args: Any, **kwargs: Any) -> Any:
    stored = _store_pair_dataset(*args, **kwargs)
    log.warning("killing this worker before the pairs' dataset is recorded (%s)", stored.dataset_id)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
    return stored  # never reached


tasks.store_pair_dataset = store_then_die  # type: ignore[assignment]

# Imported last: it builds the worker's Celery app from the environment (DAMA_*), the task patched above.
from worker.celery_app import app  # noqa: E402

__all__ = ["app"]
