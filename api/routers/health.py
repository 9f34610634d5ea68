"""``/healthz`` (the process answers) and ``/readyz`` (the job store and the broker answer). No auth: for probes."""

from __future__ import annotations

import logging
import os
import tempfile
from urllib.parse import urlsplit

import redis
from fastapi import APIRouter
from sqlalchemy import text

from api.deps import Services, ServicesDep
from api.errors import ApiError
from api.schemas import ErrorResponse, HealthPublic, ReadyPublic

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 2.0


@router.get("/healthz", summary="Liveness", description="200 while the process answers; checks nothing else.")
def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


def _check_database(services: Services) -> None:
    with services.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _check_broker(services: Services) -> None:
    url = services.settings.resolved_broker_url
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    elif scheme == "filesystem":
        # The embedded default: the broker is a folder shared with the worker; it must be writable.
        folder = services.settings.broker_folder / "queue"
        if not folder.is_dir():
            raise OSError(f"broker folder {folder} is missing")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-", suffix=".probe"):
            pass
        if not os.access(folder, os.W_OK):
            raise OSError(f"broker folder {folder} is not writable")
    else:
        with services.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_S)


@router.get(
    "/readyz",
    summary="Readiness",
    description="200 when the job store answers `SELECT 1` and the broker is reachable; 503 otherwise.",
    responses={503: {"model": ErrorResponse, "description": "A dependency is down; the message names it."}},
)
def readyz(services: ServicesDep) -> ReadyPublic:
    checks: dict[str, str] = {}
    failures: list[str] = []
    for name, probe in (("database", _check_database), ("broker", _check_broker)):
        try:
            probe(services)
        except Exception as error:
            logger.warning("readiness: %s unavailable: %s", name, error)
            checks[name] = "unavailable"
            failures.append(f"{name} unavailable ({type(error).__name__})")
        else:
            checks[name] = "ok"
    if failures:
        raise ApiError(503, "not_ready", "; ".join(failures), headers={"Retry-After": "5"})
    return ReadyPublic(status="ready", checks=checks)
