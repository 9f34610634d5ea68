"""``python -m worker`` (the ``dama worker`` command): a Celery worker on ``DAMA_WORKER_QUEUES``.

One process, the solo pool, one job at a time (see :mod:`worker.celery_app` for why). Extra arguments go to
``celery worker`` (for example ``--loglevel DEBUG``).
"""

from __future__ import annotations

import os
import socket
import sys

from jobstore.settings import Settings


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    queues = ",".join(settings.resolved_worker_queues)
    name = f"dama-{'-'.join(settings.resolved_worker_queues)}-{os.getpid()}@{socket.gethostname()}"
    from worker.celery_app import app

    extra = sys.argv[1:] if argv is None else argv
    app.worker_main(
        ["worker", "-Q", queues, "--pool", "solo", "--concurrency", "1", "--loglevel", "INFO", "-n", name, *extra]
    )


if __name__ == "__main__":
    main()
