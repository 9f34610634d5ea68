"""The FastAPI application factory: ``uvicorn --factory api.app:create_app`` (or ``dama api``).

Settings are read here, at the entry point, and nowhere else; the engine, session factory, artifact store and
Celery app are made once per process and kept on ``app.state.services``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from api.cleanup import run_periodically
from api.console.router import install_console
from api.dataset_check import DatasetChecker
from api.deps import Services
from api.errors import install_error_handlers
from api.guards import RequestGuard
from api.openapi import DESCRIPTION, TAGS, TITLE, build_openapi
from api.ratelimit import RateLimiter
from api.routers import (
    chat,
    dataset_preview,
    datasets,
    estimates,
    evaluations,
    exports,
    health,
    job_outputs,
    jobs,
    keys,
    loops,
    models,
    pair_generations,
    playground,
    usage,
    webhooks,
)
from jobstore.artifacts import open_store
from jobstore.broker import make_celery
from jobstore.db import make_engine, make_session_factory
from jobstore.settings import Settings

logger = logging.getLogger(__name__)

API_VERSION = "0.1.0"


def make_services(settings: Settings) -> Services:
    if settings.database_url is None:  # the embedded default keeps SQLite under DAMA_HOME
        settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    # With S3, the API's files are temporary working copies (uploads being checked, previews being built).
    artifacts = open_store(settings)
    return Services(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        artifacts=artifacts,
        celery=make_celery(settings),
        rate_limiter=RateLimiter(settings.rate_limit, settings.rate_limit_storage),
        auth_failure_limiter=RateLimiter(
            settings.auth_failure_limit,
            settings.rate_limit_storage,
            setting="DAMA_AUTH_FAILURE_LIMIT",
            namespace="auth-failures",
            code="too_many_failed_authentications",
            what="requests with an invalid API key from this address",
        ),
        # The chat limits guard GPU time: unlike the limits above they fail closed (api.ratelimit).
        chat_limiter=RateLimiter(
            settings.chat_rate_limit,
            settings.rate_limit_storage,
            setting="DAMA_CHAT_RATE_LIMIT",
            namespace="chat-requests",
            what="this account's chat requests",
            fail_closed=True,
        ),
        chat_token_limiter=RateLimiter(
            settings.chat_token_limit,
            settings.rate_limit_storage,
            setting="DAMA_CHAT_TOKEN_LIMIT",
            namespace="chat-tokens",
            what="this account's chat tokens",
            unit="tokens",
            fail_closed=True,
        ),
        # The inference backend is on an internal network: no proxy from the environment, no redirects.
        # Connections: more than a backend holds (it sheds load itself, 503); a request finds none within 5 s only
        # when the API is the bottleneck (503 server_overloaded, never a 5-minute wait in a pool).
        inference=httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(settings.inference_timeout_s, pool=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        ),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. ``settings`` default to the ``DAMA_`` environment (tests pass their own)."""
    settings = settings if settings is not None else Settings()
    services = make_services(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        broker = settings.resolved_broker_url.split(":", 1)[0]
        logger.info(
            "API up: database %s, broker %s, default queue %r", services.engine.url, broker, settings.default_queue
        )
        # Leftovers of a killed API (upload folders, orphaned checks): now, then every cleanup_interval_s.
        cleaner = asyncio.create_task(
            run_periodically(
                services.artifacts.uploads_dir(),
                older_than_s=settings.stale_upload_s,
                interval_s=settings.cleanup_interval_s,
            )
        )
        try:
            yield
        finally:
            cleaner.cancel()
            await services.inference.aclose()
            services.engine.dispose()
            services.celery.close()

    app = FastAPI(
        title=TITLE,
        description=DESCRIPTION,
        version=API_VERSION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        docs_url=None,  # served offline by the console module, without inline script
        redoc_url=None,
    )
    app.state.services = services
    app.state.dataset_checker = DatasetChecker(settings)
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_json_body_bytes,
        prefix_limits={"/v1/": (settings.chat_max_body_bytes, "DAMA_CHAT_MAX_BODY_BYTES")},
    )
    routers = (
        datasets,
        dataset_preview,
        estimates,  # before jobs and job outputs: /jobs/estimates/{id} is no job's path
        jobs,
        job_outputs,
        exports,
        evaluations,
        pair_generations,
        loops,
        webhooks,
        keys,
        usage,
        chat,
        playground,
    )
    for module in (*routers, models, health):
        app.include_router(module.router)
    install_console(app)

    def openapi() -> dict[str, Any]:
        return build_openapi(app)

    app.openapi = openapi  # type: ignore[method-assign]
    return app
