"""A run's undelivered reports (metric points, events, checkpoint registrations), oldest first.

The job store can be unreachable for minutes while training goes on (a Postgres restart, a failover, a network
cut). Nothing the run reports may be lost meanwhile, and a long outage must not grow the worker's memory without
bound: the newest ``memory_limit`` reports stay in memory, older ones are appended to a JSONL spool file in the
job's work folder. The spool is an anonymous temporary file: it vanishes with the process, since a run that dies
is resumed from its last checkpoint and reports everything after it again.

Delivery takes a batch (:meth:`Outbox.take`), writes it, and confirms it (:meth:`Outbox.delivered`). Until it is
confirmed, ``take`` returns the very same batch: a delivery retried after a commit whose outcome was never heard
carries the same batch number and rows, so the job store can tell that it already holds them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from pathlib import Path
from typing import IO, Any

# ["metric", step, key, value] | ["event", type, message, data] | ["checkpoint", step, path]: JSON as they stand.
Report = list[Any]

MEMORY_LIMIT = 20_000  # reports held in memory (a few MB) before older ones go to the spool file


class Outbox:
    def __init__(self, *, memory_limit: int = MEMORY_LIMIT, spool_dir: Path | None = None) -> None:
        self.memory_limit = memory_limit
        self.spool_dir = spool_dir
        self.spilled = 0  # reports ever written to the spool file
        self._memory: deque[Report] = deque()
        self._spool: IO[bytes] | None = None
        self._spool_read = 0  # byte offset of the oldest undelivered line
        self._spool_lines = 0  # undelivered lines in the spool
        self._batch: list[Report] | None = None  # taken, not yet confirmed
        self._batch_end: int | None = None  # spool offset past the batch; None when it came from memory

    def __len__(self) -> int:
        in_flight = len(self._batch) if self._batch is not None and self._batch_end is None else 0
        return in_flight + self._spool_lines + len(self._memory)

    def add(self, report: Report) -> None:
        self._memory.append(report)
        if len(self._memory) > self.memory_limit:
            self._spill()

    def take(self, limit: int) -> list[Report]:
        """The oldest undelivered reports (at most ``limit``); the same list again until :meth:`delivered`."""
        if self._batch is not None:
            return self._batch
        if self._spool_lines:  # the spool holds older reports than memory
            assert self._spool is not None
            self._spool.seek(self._spool_read)
            batch = [json.loads(self._spool.readline()) for _ in range(min(limit, self._spool_lines))]
            self._batch_end = self._spool.tell()
        else:
            batch = [self._memory.popleft() for _ in range(min(limit, len(self._memory)))]
            self._batch_end = None
        self._batch = batch or None  # nothing to deliver is not a batch: later reports must not wait behind it
        return batch

    def delivered(self) -> None:
        """The batch from :meth:`take` is stored: forget it."""
        if self._batch is None:
            return
        if self._batch_end is not None:
            assert self._spool is not None
            self._spool_read, self._spool_lines = self._batch_end, self._spool_lines - len(self._batch)
            if not self._spool_lines:  # all of it delivered: reuse the file from its start
                self._spool.truncate(0)
                self._spool_read = 0
        self._batch, self._batch_end = None, None

    def clear(self) -> None:
        """Drop everything (the run lost the job: its reports are no longer wanted)."""
        self._memory.clear()
        self._batch, self._batch_end = None, None
        self._spool_lines = self._spool_read = 0
        if self._spool is not None:
            self._spool.truncate(0)

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _spill(self) -> None:
        if self._spool is None:
            if self.spool_dir is not None:
                self.spool_dir.mkdir(parents=True, exist_ok=True)
            # Open for the outbox's lifetime (closed in close()); anonymous, so nothing is left behind on a crash.
            self._spool = tempfile.TemporaryFile(  # noqa: SIM115
                "w+b", prefix="report-spool-", suffix=".jsonl", dir=self.spool_dir
            )
        self._spool.seek(0, os.SEEK_END)
        self._spool.writelines(json.dumps(report).encode() + b"\n" for report in self._memory)
        self._spool.flush()
        self._spool_lines += len(self._memory)
        self.spilled += len(self._memory)
        self._memory.clear()
