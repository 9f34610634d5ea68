"""The batcher: one thread per server that gathers requests into batches and generates them.

A request goes through three steps:

1. **admission** (:meth:`Scheduler.admit`): at most ``max_concurrent`` requests are held at once, queued or
   generating (from the moment the server accepts one until its answer is delivered); one more is refused with
   503 ``server_overloaded`` and a ``Retry-After``, so overload sheds load instead of growing a queue;
2. **queue** (:meth:`Scheduler.submit`): a :class:`Ticket` (the request, its decoding settings, its model lease
   and where its events go);
3. **batch**: the scheduler thread takes the oldest ticket, waits up to ``window_s`` after its arrival for more
   tickets on the same model and adapter (their sampling may differ: rows are decoded each on its own), up to
   ``max_batch``, and runs them in one ``generate`` call (:func:`dama_engine.serving.batch.run_batch`). A ticket
   that waited behind a running batch starts the next one at once, with whatever compatible tickets queued
   meanwhile, so batches fill up by themselves under load.

Cancelling (:meth:`Scheduler.cancel`, when a client goes away): a queued ticket leaves the queue; a generating
one's row stops at the next step (its batch goes on). Its admission is released by whoever admitted it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from dama_engine.forward import GenerationRequest
from dama_engine.serving.batch import BatchRow, Failed, Sink, deliver, run_batch
from dama_engine.serving.cache import Lease
from dama_engine.serving.protocol import ChatError, RowSettings, server_error

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


@dataclass(eq=False)
class Ticket:
    """A request waiting for, or in, a batch."""

    lease: Lease
    row: BatchRow
    arrived: float = field(default_factory=time.monotonic)

    @classmethod
    def make(
        cls, lease: Lease, request: GenerationRequest, settings: RowSettings, sink: Sink, *, stream: bool = False
    ) -> Ticket:
        return cls(lease, BatchRow(request, settings, sink, stream=stream))


class Admission:
    """One held place among ``max_concurrent``; :meth:`release` gives it back (again: no effect)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._released = False

    def release(self) -> None:
        with self._scheduler._lock:
            if not self._released:
                self._released = True
                self._scheduler._held -= 1


class Scheduler:
    """Admission, the queue and the batching thread (module docstring)."""

    def __init__(self, *, max_batch: int, window_s: float, max_concurrent: int) -> None:
        if max_batch < 1 or max_concurrent < 1 or window_s < 0:
            raise ValueError("max_batch and max_concurrent must be positive, window_s not negative")
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_concurrent = max_concurrent
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._held = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # generate calls made (for tests and logs)
        self.rows = 0  # rows answered in them

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dama-infer-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse what is queued and what runs (its rows stop at their next step), and wait for the thread."""
        with self._wake:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = list(self._running)
            for ticket in running:
                ticket.row.cancelled.set()  # a cancelled row gets no more events: its request is told here
            self._wake.notify_all()
        for ticket in queued + running:
            deliver(ticket.row, Failed(_shutting_down()))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- requests -----------------------------------------------------------------------------------------------
    def admit(self) -> Admission:
        """A place for one more request, or :class:`ChatError` 503 ``server_overloaded``."""
        with self._lock:
            if self._stopping:
                raise _shutting_down()
            if self._held >= self.max_concurrent:
                raise ChatError(
                    f"The server holds {self.max_concurrent} requests already; retry shortly.",
                    status=503,
                    code="server_overloaded",
                    kind="server_error",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._held += 1
            return Admission(self)

    @property
    def held(self) -> int:
        """Requests admitted and not released."""
        with self._lock:
            return self._held

    @property
    def queued(self) -> int:
        """Tickets waiting for a batch."""
        with self._lock:
            return len(self._queue)

    def submit(self, ticket: Ticket) -> None:
        with self._wake:
            if self._stopping:
                raise _shutting_down()
            self._queue.append(ticket)
            self._wake.notify_all()

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: drop the ticket if queued, else stop its row at the next step (no event follows)."""
        with self._wake:
            ticket.row.cancelled.set()
            with contextlib.suppress(ValueError):  # not queued (any more)
                self._queue.remove(ticket)
            self._wake.notify_all()

    # ---- the thread ---------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[Ticket] | None:
        """Wait for the oldest ticket and its batch (None: stopping)."""
        with self._wake:
            while True:
                if self._stopping:
                    return None
                if self._queue:
                    first = self._queue[0]
                    batch = [t for t in self._queue if t.lease.batch_key == first.lease.batch_key][: self.max_batch]
                    remaining = first.arrived + self.window_s - time.monotonic()
                    if len(batch) >= self.max_batch or remaining <= 0:
                        for ticket in batch:
                            self._queue.remove(ticket)
                        self._running = batch
                        return batch
                    self._wake.wait(remaining)
                else:
                    self._wake.wait()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                lease = batch[0].lease
                with lease.generating() as model:
                    loaded = lease.loaded
                    run_batch(model, loaded.processor, [t.row for t in batch], device=loaded.device, dtype=loaded.dtype)
                self.batches += 1
                self.rows += len(batch)
            except Exception:  # run_batch answers its rows' own failures; this is the model switch failing
                log.exception("a batch of %d requests failed", len(batch))
                for ticket in batch:
                    deliver(ticket.row, Failed(server_error("The server could not run the model.")))
            finally:
                with self._lock:
                    self._running = []


def _shutting_down() -> ChatError:
    return ChatError(
        "The server is shutting down; retry shortly.",
        status=503,
        code="server_shutting_down",
        kind="server_error",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
