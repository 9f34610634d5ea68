"""What routes depend on: the process's services, a database session, and the tenant behind the API key."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import httpx
from celery import Celery
from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError
from api.ratelimit import RateLimiter
from jobstore import repository
from jobstore.artifacts import ArtifactStore
from jobstore.models import Tenant
from jobstore.settings import Settings


@dataclass(frozen=True)
class Services:
    """Everything a request may use, made once per process by :func:`api.app.create_app`."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    artifacts: ArtifactStore
    celery: Celery
    rate_limiter: RateLimiter
    auth_failure_limiter: RateLimiter
    chat_limiter: RateLimiter
    chat_token_limiter: RateLimiter
    inference: httpx.AsyncClient


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    """One session per request; routes commit what they change. Closed as soon as the route function returns
    (scope="function"), so a streamed response holds no database connection."""
    session = services.session_factory()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `dama admin create-key --tenant NAME`, sent as `Authorization: Bearer dama_...`.",
)


def get_current_tenant(
    request: Request,
    session: SessionDep,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "missing_api_key",
            "send an API key as 'Authorization: Bearer <key>' (create one with `dama admin create-key`)",
            headers=challenge,
        )
    # An address that sent too many invalid keys is refused before its key costs a database query.
    address = request.client.host if request.client is not None else "unknown"
    services.auth_failure_limiter.refuse_if_exhausted(address)
    tenant = repository.tenant_for_key(
        session, key=credentials.credentials, pepper=services.settings.resolved_api_key_pepper
    )
    if tenant is None:
        services.auth_failure_limiter.count(address)
        raise ApiError(401, "invalid_api_key", "the API key is not valid (unknown or revoked)", headers=challenge)
    services.rate_limiter.check(tenant.id)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]

# Pagination parameters shared by the list routes.
Limit = Annotated[int, Query(ge=1, le=100, description="Items per page (1-100).", examples=[20])]
After = Annotated[
    str | None,
    Query(
        max_length=100,
        description="Cursor: the next_cursor of the previous page (the id of its last item).",
        examples=["job_0194b1c2d3e4a1b2c3d4e5f6"],
    ),
]

# ``?after=`` and ``?limit=`` of the two events routes (jobs and evaluations).
MAX_SEQ = 2**31 - 1  # event seqs are 32-bit integers in the job store; a larger cursor is refused, not a 500
EventsAfter = Annotated[
    int, Query(ge=0, le=MAX_SEQ, description="Events after this seq (0: from the start).", examples=[0])
]
EventsLimit = Annotated[int, Query(ge=1, le=1000, description="Events per page (1-1000).", examples=[100])]

# The Idempotency-Key header of POST /jobs and POST /evaluations (POST /datasets documents its own: the file).
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Retry safely: the same key with the same body returns the job created the first time "
        "(1-200 characters, no control characters).",
    ),
]
