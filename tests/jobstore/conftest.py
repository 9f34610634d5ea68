"""The job store on both databases it runs on: the real Postgres and SQLite (the embedded default, migrated with the
real Alembic chain)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.orm import Session, sessionmaker

from jobstore.db import make_engine, make_session_factory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["postgres", "sqlite"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A session factory on each database in turn (a module's own ``factory`` fixture may narrow it)."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'dama.db'}"
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["url"] = url
        command.upgrade(config, "head")
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()
