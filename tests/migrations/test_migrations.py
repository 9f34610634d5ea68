"""Alembic: upgrade to head and downgrade to base on the real Postgres, and on SQLite (the embedded default)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from jobstore import repository, webhook_store
from jobstore.db import make_session_factory, session_scope
from jobstore.models import Base
from tests.conftest import PG_ADMIN_URL

ROOT = Path(__file__).resolve().parents[2]
TABLES = {t.name for t in Base.metadata.sorted_tables}


def _config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = url
    return config


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_and_downgrade_on_postgres() -> None:
    name = f"dama_migrate_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        command.upgrade(_config(url), "head")
        assert _tables(url) == TABLES
        command.downgrade(_config(url), "base")
        assert _tables(url) == set()
        command.upgrade(_config(url), "head")  # and up again from base
        assert _tables(url) == TABLES
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_upgrade_and_downgrade_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dama.db'}"
    command.upgrade(_config(url), "head")
    assert _tables(url) == TABLES
    command.downgrade(_config(url), "base")
    assert _tables(url) == set()


def test_models_and_migrations_agree(pg_url: str) -> None:
    """No difference between the models' metadata and the migrated schema (autogenerate finds nothing)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(pg_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == [], f"models differ from migrations: {diff}"


def test_tenant_names_that_clash_by_case_stop_the_upgrade(tmp_path: Path) -> None:
    """0002 adds the unique index on lower(name); names that already clash are named, not silently merged."""
    url = f"sqlite:///{tmp_path / 'dama.db'}"
    command.upgrade(_config(url), "0001")
    engine = create_engine(url)
    with engine.begin() as connection:
        for tenant_id, name in (("ten_1", "Alpha"), ("ten_2", "alpha"), ("ten_3", "beta")):
            connection.execute(
                text("INSERT INTO tenants (id, name, created_at) VALUES (:id, :name, CURRENT_TIMESTAMP)"),
                {"id": tenant_id, "name": name},
            )
    with pytest.raises(RuntimeError, match=r"'alpha' \(2 tenants\)"):
        command.upgrade(_config(url), "head")
    with engine.begin() as connection:
        connection.execute(text("UPDATE tenants SET name = 'alpha-old' WHERE id = 'ten_1'"))
    engine.dispose()
    command.upgrade(_config(url), "head")


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_downgrading_0008_spells_out_the_all_events_default(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An endpoint made with the default stores "*" from 0008 on; 0007 knows no "*", so the downgrade writes the
    event types 0007 announces (what the endpoint received there). Explicit lists stay as they are."""
    url = f"sqlite:///{tmp_path / 'dama.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    command.upgrade(_config(url), "head")
    engine = create_engine(url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            tenant = repository.get_or_create_tenant(session, name=f"hooks-{secrets.token_hex(3)}")
            everything = webhook_store.create_endpoint(session, tenant_id=tenant.id, url="https://a.example/hook")
            explicit = webhook_store.create_endpoint(
                session, tenant_id=tenant.id, url="https://b.example/hook", event_types=["job.succeeded"]
            )
            ids = {everything.id: "all", explicit.id: "explicit"}
        command.downgrade(_config(url), "0007_fair_share")
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT id, event_types FROM webhook_endpoints WHERE id IN (:a, :b)"),
                {"a": everything.id, "b": explicit.id},
            ).all()
    finally:
        engine.dispose()
        if database == "postgres":
            command.upgrade(_config(url), "head")  # the session's database goes on at head
    stored = {ids[row_id]: json.loads(types) if isinstance(types, str) else types for row_id, types in rows}
    assert stored == {
        "all": [
            f"{kind}.{status}"
            for kind in ("job", "evaluation")
            for status in ("running", "succeeded", "failed", "cancelled")
        ],
        "explicit": ["job.succeeded"],
    }
