"""What every run kind shares (``jobstore.runs``), on the real Postgres and on SQLite: a run is silent by its
heartbeat, else by its start (never merely because it has no heartbeat yet), and a re-claimed run keeps the start
of its first attempt."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from jobstore import exports
from jobstore import repository as repo
from jobstore.db import session_scope
from jobstore.models import utcnow


def _export(factory: sessionmaker[Session]) -> str:
    with session_scope(factory) as session:
        tenant = repo.get_or_create_tenant(session, name=f"runs-{utcnow().timestamp()}")
        job = repo.create_job(session, tenant_id=tenant.id, spec={"model": "m"}, dataset_id=None, queue="q")
        return exports.create_export(session, tenant_id=tenant.id, job_id=job.id, format="merged").id


def test_a_run_without_a_heartbeat_is_judged_by_its_start(factory: sessionmaker[Session]) -> None:
    """An export that was running when migration 0008 added ``heartbeat_at`` has none: it is stale only once its
    start is older than the cutoff, not at once."""
    export_id = _export(factory)
    with session_scope(factory) as session:
        export = exports.claim_export(session, export_id=export_id, worker="old-worker")
        assert export is not None
        export.heartbeat_at = None  # as a row claimed before the column existed
    timeout = timedelta(seconds=30)
    with session_scope(factory) as session:
        assert export_id not in exports.stale_exports(session, older_than=utcnow() - timeout)
        assert exports.lock_stale_export(session, export_id=export_id, older_than=utcnow() - timeout) is None
    with session_scope(factory) as session:
        export = exports.get_export(session, export_id=export_id)
        assert export is not None and export.started_at is not None
        export.started_at -= 2 * timeout  # started long ago, and still no sign of life
    with session_scope(factory) as session:
        assert export_id in exports.stale_exports(session, older_than=utcnow() - timeout)
        assert exports.lock_stale_export(session, export_id=export_id, older_than=utcnow() - timeout) is not None


def test_a_heartbeat_keeps_a_long_run_alive(factory: sessionmaker[Session]) -> None:
    export_id = _export(factory)
    with session_scope(factory) as session:
        export = exports.claim_export(session, export_id=export_id, worker="w")
        assert export is not None and export.started_at is not None
        export.started_at -= timedelta(hours=1)
    with session_scope(factory) as session:
        assert exports.heartbeat_export(session, export_id=export_id, worker="w", attempt=1)
    with session_scope(factory) as session:
        assert export_id not in exports.stale_exports(session, older_than=utcnow() - timedelta(seconds=30))


def test_a_reclaimed_export_keeps_its_first_start(factory: sessionmaker[Session]) -> None:
    export_id = _export(factory)
    with session_scope(factory) as session:
        first = exports.claim_export(session, export_id=export_id, worker="w1")
        assert first is not None and first.started_at is not None
        started = first.started_at
    with session_scope(factory) as session:
        export = exports.lock_stale_export(session, export_id=export_id, older_than=utcnow() + timedelta(seconds=1))
        assert export is not None
        assert exports.recover_stale_export(session, export=export, max_attempts=3) == "queued"
    with session_scope(factory) as session:
        again = exports.claim_export(session, export_id=export_id, worker="w2")
        assert again is not None and again.attempts == 2
        assert again.started_at == started
