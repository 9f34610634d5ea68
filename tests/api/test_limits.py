"""Rate limits and the active-job quota: two real API servers sharing their request counters through Redis."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError
from api.ratelimit import RateLimiter
from tests.api.conftest import ApiServer, _server_env, _start, assert_error, create_key, upload

RATE = 12  # requests per minute and tenant on the servers below


@pytest.fixture(scope="module")
def limited_pair(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ApiServer]]:
    """Two API replicas: 12 requests a minute per tenant, counted in Redis; at most 2 active jobs per tenant."""
    queue = f"test-limits-{secrets.token_hex(4)}"
    servers: list[ApiServer] = []
    starts = []
    for name in ("a", "b"):
        tmp = tmp_path_factory.mktemp(f"limits-{name}")
        env = _server_env(
            pg_url,
            redis_url,
            tmp_path_factory.getbasetemp() / "limits-artifacts",
            queue,
            DAMA_RATE_LIMIT=f"{RATE}/minute",
            DAMA_RATE_LIMIT_STORAGE=redis_url,
            DAMA_MAX_ACTIVE_JOBS="2",
        )
        start = _start(tmp, env, queue)
        servers.append(next(start))
        starts.append(start)
    yield servers
    for start in starts:
        start.close()
    redis.Redis.from_url(redis_url).delete(queue)


def test_a_tenant_over_its_rate_gets_429_on_every_replica(
    limited_pair: list[ApiServer], db: sessionmaker[Session]
) -> None:
    first, second = limited_pair
    key, other_key = create_key(db, f"rate-{secrets.token_hex(3)}"), create_key(db, f"rate-{secrets.token_hex(3)}")
    with first.client(key) as a, second.client(key) as b:
        # Half the allowance on each replica: the counters are shared, so the next request is one too many.
        for client in (a, b):
            for _ in range(RATE // 2):
                assert client.get("/jobs").status_code == 200
        for client in (a, b):
            response = client.get("/jobs")
            error = assert_error(response, 429, "rate_limit_exceeded")
            assert f"{RATE} per minute" in error["message"]
            assert 1 <= int(response.headers["Retry-After"]) <= 60
            assert response.headers["X-RateLimit-Limit"] == str(RATE)
            assert response.headers["X-RateLimit-Remaining"] == "0"
            assert int(response.headers["X-RateLimit-Reset"]) >= int(time.time())
    # Other tenants are not held back; requests without a valid key are refused before they are counted.
    with first.client(other_key) as other:
        assert other.get("/jobs").status_code == 200
    with first.client("dama_not-a-key") as stranger:
        assert_error(stranger.get("/jobs"), 401, "invalid_api_key")
    assert httpx.get(f"{first.url}/healthz").status_code == 200


def test_active_job_quota(limited_pair: list[ApiServer], db: sessionmaker[Session], demo_archive: bytes) -> None:
    server = limited_pair[0]
    key = create_key(db, f"quota-{secrets.token_hex(3)}")
    with server.client(key) as client:
        dataset = upload(client, demo_archive, "demo.zip").json()
        spec: dict[str, Any] = {
            "model": "dama/tiny-llava",
            "dataset_id": dataset["id"],
            "method": "dpo",
        }  # rows without hardness
        first = client.post("/jobs", json=spec, headers={"Idempotency-Key": "quota-1"})
        assert first.status_code == 201, first.text
        assert client.post("/jobs", json=spec).status_code == 201
        refused = client.post("/jobs", json=spec)
        error = assert_error(refused, 429, "too_many_active_jobs")
        assert "2 queued or running jobs" in error["message"] and refused.headers["Retry-After"] == "60"
        evaluation = {"model": "dama/tiny-llava", "preference_dataset_id": dataset["id"]}
        assert_error(client.post("/evaluations", json=evaluation), 429, "too_many_active_jobs")
        # A retry of an accepted request still answers its job; nothing was created by the refusals.
        replay = client.post("/jobs", json=spec, headers={"Idempotency-Key": "quota-1"})
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
        assert len(client.get("/jobs").json()["data"]) == 2
        # A job that ends frees its place.
        assert client.post(f"/jobs/{first.json()['id']}/cancel").json()["status"] == "cancelled"
        assert client.post("/jobs", json=spec).status_code == 201


def test_rate_limiter_unit(redis_url: str) -> None:
    limiter = RateLimiter("3/minute;2/second", "memory://")
    limiter.check("t")
    limiter.check("t")
    with pytest.raises(ApiError) as raised:
        limiter.check("t")  # the per-second limit; the refused request uses none of the minute's three
    assert raised.value.status_code == 429 and "2 per second" in raised.value.message
    limiter.check("u")  # another tenant
    time.sleep(1.1)
    limiter.check("t")  # a new second; the third request of the minute
    with pytest.raises(ApiError, match="3 per minute"):
        limiter.check("t")

    unlimited = RateLimiter("", "memory://")
    for _ in range(100):
        unlimited.check("t")
    with pytest.raises(ValueError, match="DAMA_RATE_LIMIT 'lots' is not a rate limit"):
        RateLimiter("lots", "memory://")

    # A counter store that is down, or that accepts connections and never answers, lets requests through at once
    # instead of failing or stalling them, and is skipped for a while after a failure.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing ever reads or replies
        for uri in (f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{silent.getsockname()[1]}/0"):
            down = RateLimiter("1/minute", uri)
            start = time.monotonic()
            down.check("t")
            assert time.monotonic() - start < 2.0, uri
            start = time.monotonic()
            for _ in range(50):
                down.check("t")
            assert time.monotonic() - start < 0.05, "after a failure the store is not asked again for a while"


def test_the_openapi_document_lists_429(api_server: ApiServer) -> None:
    paths = httpx.get(f"{api_server.url}/openapi.json").json()["paths"]
    assert "too_many_active_jobs" in paths["/jobs"]["post"]["responses"]["429"]["description"]
    assert "too_many_active_jobs" in paths["/evaluations"]["post"]["responses"]["429"]["description"]
    assert "too_many_pending_estimates" in paths["/jobs/estimate"]["post"]["responses"]["429"]["description"]
    assert "rate_limit_exceeded" in paths["/jobs"]["get"]["responses"]["429"]["description"]
    assert "429" not in paths["/healthz"]["get"]["responses"]
