"""Fixtures shared by the service tests: a fresh Postgres database migrated to head, Redis, and the proving ground.

The machine runs PostgreSQL on 127.0.0.1:5432 (trust auth) and Redis on 127.0.0.1:6379; `.ci/run` starts them
if they are down. Each test session gets its own database (created and dropped here) and its own Redis
database number and queue names, so runs never see each other's data.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dama_engine.proving.ground import ProvingGround

# Torch's thread count, set before torch is imported (OMP_NUM_THREADS is read then) and inherited by every
# subprocess: 1 unless DAMA_TORCH_THREADS says otherwise, the fastest on a shared 2-core machine
# (dama_engine.threads); the engine's runs apply DAMA_TORCH_THREADS themselves.
os.environ.setdefault("DAMA_TORCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", os.environ["DAMA_TORCH_THREADS"])

PG_ADMIN_URL = os.environ.get("DAMA_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _worker_redis_url(url: str, worker: str | None) -> str:
    """``url`` with its database number moved up by the pytest-xdist worker's index (gw0: +0, gw1: +1, ...), so
    parallel workers never share a Redis database (rate-limit counters, Celery queues, locks)."""
    if not worker or not worker.startswith("gw"):
        return url
    base, _, number = url.rpartition("/")
    if not number.isdigit():
        return url
    return f"{base}/{int(number) + int(worker[2:])}"


REDIS_URL = _worker_redis_url(
    os.environ.get("DAMA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9"), os.environ.get("PYTEST_XDIST_WORKER")
)


def _pg_url(database: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database


@contextmanager
def migrated_database(prefix: str = "dama_test") -> Iterator[str]:
    """A new Postgres database, upgraded to the newest Alembic revision; dropped afterwards."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = _pg_url(name)
    try:
        config = Config(str(Path(__file__).parent.parent / "alembic.ini"))
        config.attributes["url"] = url
        command.upgrade(config, "head")
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The session's database (:func:`migrated_database`)."""
    with migrated_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    return REDIS_URL


@pytest.fixture(scope="session")
def proving_ground(tmp_path_factory: pytest.TempPathFactory) -> ProvingGround:
    """The proving ground (``dama_engine.proving``: seeing base, on-policy pairs, held-out scenes), built once per
    test run: under ``DAMA_PROVING_DIR`` when that is set (and reused there while its recipe holds), else in a
    temporary folder (a few minutes at one thread). Under pytest-xdist the workers share that folder (the run's
    common temporary root) and an exclusive lock on it: the first to need it builds it, the others wait and reuse
    it (its recipe stamps say it is complete)."""
    import fcntl

    from dama_engine.proving.ground import prepare_proving_ground

    configured = os.environ.get("DAMA_PROVING_DIR")
    if configured:
        root = Path(configured)
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "proving"  # the same folder for every worker of this run
    else:
        root = tmp_path_factory.mktemp("proving")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return prepare_proving_ground(root)
