"""What every recoverable run kind shares (jobs and evaluations in ``jobs``, merged exports in ``exports``): when a
held run counts as silent, the row locks the sweeper and a finishing worker take, and when the sweeper gives up.

A run is *silent* when its last sign of life is older than the cutoff: its heartbeat, or, for a row that has
never heartbeaten (an export that was running when migration 0008 added ``heartbeat_at``), its start. A bare
``heartbeat_at IS NULL`` would make every such run stale at once, and re-queue work that is still going.

Each table is one :class:`RunTable` (its model and the statuses in which a worker holds a run); the repository
modules (:mod:`jobstore.repository`, :mod:`jobstore.exports`) name their own functions over it, and set statuses
their own way (a job's change records events and webhooks).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import ColumnElement, Select, and_, func, select
from sqlalchemy.orm import Session

from jobstore.models import Export, Job

Run = TypeVar("Run", Job, Export)


def gave_up_reason(attempts: int, *, max_attempts: int) -> str | None:
    """Why the sweeper fails (rather than re-queues) a silent run that has had ``attempts`` runs; None while it
    may run again."""
    if attempts < max_attempts:
        return None
    return f"the worker stopped responding {attempts} times; giving up"


@dataclass(frozen=True)
class RunTable(Generic[Run]):
    """A table of runs a worker claims, heartbeats and may lose to the sweeper."""

    model: type[Run]
    held: tuple[str, ...]  # the statuses in which a worker holds the run (and heartbeats it)
    only: ColumnElement[bool] | None = None  # rows of the table that are runs at all (None: every row)

    def silent(self, older_than: datetime) -> ColumnElement[bool]:
        """The staleness predicate: no sign of life (heartbeat, else start) since ``older_than``."""
        stale = func.coalesce(self.model.heartbeat_at, self.model.started_at) < older_than
        return stale if self.only is None else and_(self.only, stale)

    def stale_ids(self, session: Session, *, older_than: datetime) -> list[str]:
        """Ids of held runs silent since ``older_than``, oldest first."""
        query = select(self.model.id).where(self.model.status.in_(self.held), self.silent(older_than))
        return list(session.scalars(query.order_by(self.model.id)))

    def lock_stale(self, session: Session, *, run_id: str, older_than: datetime) -> Run | None:
        """Lock a run that is still stale, for recovery; None when it changed since it was listed (a heartbeat
        came; another sweeper re-queued it and a worker claimed it) or another sweeper holds it (``SKIP LOCKED``
        on Postgres): one stale run is recovered once."""
        query = select(self.model).where(
            self.model.id == run_id, self.model.status.in_(self.held), self.silent(older_than)
        )
        return _locked(session, query, skip_locked=True)

    def lock_owned(self, session: Session, *, run_id: str, worker: str, attempt: int) -> Run | None:
        """Lock the run for a final write if ``worker`` still holds it in ``attempt``; else None. A worker whose
        heartbeats went silent may have lost the run to the sweeper (re-queued, perhaps claimed again): it must
        then leave the row to the run's new owner."""
        query = select(self.model).where(
            self.model.id == run_id,
            self.model.status.in_(self.held),
            self.model.worker == worker,
            self.model.attempts == attempt,
        )
        return _locked(session, query)


def _locked(session: Session, query: Select[Run], *, skip_locked: bool = False) -> Run | None:
    """The row ``query`` finds, fresh from the database and locked ``FOR UPDATE`` on Postgres (SQLite, the
    embedded default, has no row locks: its writes are serialised)."""
    query = query.execution_options(populate_existing=True)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=skip_locked)
    return session.scalar(query)
