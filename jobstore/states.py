"""The job state machine: the one place that decides which status changes are legal.

queued ──► running ──► succeeded
  │  ▲        │  └───► failed
  │  └────────┤ (re-queued by the sweeper after a worker died, while attempts remain)
  │           └──► cancelling ──► cancelled (or failed / succeeded if it ended first)
  └──► cancelled / failed
"""

from __future__ import annotations

from enum import StrEnum

from dama_settings.names import STAGES as STAGES


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class ErrorKind(StrEnum):
    user_error = "user_error"
    system_error = "system_error"


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.running: frozenset(
        {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling, JobStatus.queued, JobStatus.cancelled}
    ),
    JobStatus.cancelling: frozenset({JobStatus.cancelled, JobStatus.failed, JobStatus.succeeded}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


class IllegalTransition(ValueError):
    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"a job cannot go from {current} to {target}")
        self.current = current
        self.target = target


def check_transition(current: str, target: str) -> JobStatus:
    """Return ``target`` as a :class:`JobStatus` if ``current -> target`` is legal, else raise."""
    source, destination = JobStatus(current), JobStatus(target)
    if destination not in TRANSITIONS[source]:
        raise IllegalTransition(current, target)
    return destination
