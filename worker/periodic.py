"""A daemon thread that runs one pass of some work every few seconds until stopped: the base of the worker's
sweeper (:mod:`worker.sweeper`) and webhook dispatcher (:mod:`worker.webhooks`)."""

from __future__ import annotations

import logging
import threading

from worker.progress import store_unreachable

log = logging.getLogger(__name__)


class PeriodicThread:
    """Calls :meth:`run_pass` now and then every :attr:`interval_s` seconds (at once again while it returns
    True). A pass that fails is logged, never fatal: one line per pass while the job store is down."""

    label = "periodic"
    interval_s = 1.0
    stop_timeout_s = 10.0

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dama-{self.label}", daemon=True)

    def run_pass(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.stop_timeout_s)

    def _run(self) -> None:
        while not self._stopped.is_set():
            again = False
            try:
                again = self.run_pass()
            except Exception as error:
                if store_unreachable(error):  # a line per pass while the job store is down, not a traceback
                    log.warning("%s: the job store is unreachable: %s", self.label, str(error).splitlines()[0])
                else:
                    log.exception("%s: pass failed", self.label)
            if not again:
                self._stopped.wait(self.interval_s)
