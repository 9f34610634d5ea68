"""Engines and sessions. One engine per process, made at the entry point from :class:`Settings`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Several threads (API) and processes (worker) share the file: wait on locks instead of failing.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif url.startswith("postgresql") and "connect_timeout" not in url:
        # A database behind a network cut must fail a connection attempt in seconds, not after TCP's minutes:
        # the worker retries with backoff and its training goes on meanwhile.
        kwargs["connect_args"] = {"connect_timeout": 10}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def page(session: Session, query: Any, model: Any, *, limit: int, after: str | None) -> tuple[list[Any], bool]:
    """A page of ``query``, newest first; ``after`` is the id of the last item of the previous page (ids sort by
    creation). Returns the rows and whether more follow."""
    if after is not None:
        query = query.where(model.id < after)
    rows = list(session.scalars(query.order_by(model.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
