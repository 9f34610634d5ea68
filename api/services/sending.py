"""Sending a committed run's message to the broker (a job, an evaluation, an export).

The row is committed before the message is sent, so a worker never receives an id it cannot find; if the broker
is down the run simply stays queued and a worker's sweeper sends it again (Postgres, not Redis, is the source of
truth). The request that created it succeeds either way: a broker outage is no reason for a 500. A job estimate,
which no sweeper re-sends, is failed at once instead (:mod:`api.services.estimates` says so with ``then``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery

logger = logging.getLogger(__name__)


SWEEPER_RESENDS = "the sweeper sends it again"


def send_committed(
    enqueue: Callable[..., None], celery: Celery, *, queue: str, then: str = SWEEPER_RESENDS, **run_id: str
) -> bool:
    """``enqueue(celery, queue=queue, **run_id)`` (``jobstore.broker.enqueue_job`` / ``enqueue_export`` with the
    run's id); False, logged with ``then`` (what becomes of the run), when the broker could not take it."""
    try:
        enqueue(celery, queue=queue, **run_id)
    except Exception as error:  # broker down: the run is safe in the job store
        logger.warning("%s is queued but could not be sent to queue %r (%s); %s", run_id, queue, error, then)
        return False
    return True
