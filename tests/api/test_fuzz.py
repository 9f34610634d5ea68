"""A bounded fuzzing run of the OpenAPI document (schemathesis) against a real uvicorn on Postgres and Redis.

Every operation gets the document's examples, its boundary values and generated requests (valid and invalid),
with a valid API key, for at most ``FUZZ_SECONDS``. Asserted: no 5xx at all, and every response matches what
the document says (status, schema). The server runs in a process that may reach the loopback address only
(``loopback_only.py``): nothing a fuzzed request does may make the service talk to the outside world.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository
from jobstore.artifacts import ArtifactStore
from jobstore.db import session_scope
from jobstore.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tests.api.conftest import PEPPER, ROOT, ApiServer, _server_env, _start, create_key, upload

# The run's budget; with start-up and teardown the test stays well under 3 minutes. Longer runs by hand:
# DAMA_TEST_FUZZ_SECONDS=1800 (and another DAMA_TEST_FUZZ_SEED).
FUZZ_SECONDS = int(os.environ.get("DAMA_TEST_FUZZ_SECONDS", "120"))
SEED = int(os.environ.get("DAMA_TEST_FUZZ_SEED", "12"))  # the same requests on every CI run
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzz_server(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("api-fuzz")
    queue = f"test-fuzz-{secrets.token_hex(4)}"  # no worker consumes it: fuzzed jobs stay queued
    env = _server_env(
        pg_url,
        redis_url,
        tmp / "artifacts",
        queue,
        DAMA_TEST_EGRESS_LOG=str(tmp / "egress.log"),
        DAMA_MAX_UPLOAD_BYTES=str(256 * 1024),
        DAMA_RATE_LIMIT="",
    )
    yield from _start(tmp, env, queue, runner=(str(Path(__file__).with_name("loopback_only.py")),))


def _known_ids(server: ApiServer, key: str, db: sessionmaker[Session], demo_archive: bytes) -> dict[str, list[str]]:
    """Real objects of the fuzzing tenant, so that fuzzed requests reach past the 404 of an unknown id: two
    datasets, a queued job, a succeeded one with an adapter, and an evaluation."""
    with server.client(key) as client:
        datasets = [upload(client, demo_archive, "demo.zip").json()["id"] for _ in range(2)]
        spec = {"model": "dama/tiny-llava", "dataset_id": datasets[0], "hyperparameters": {"max_steps": 2}}
        jobs = [client.post("/jobs", json=spec).json()["id"] for _ in range(2)]
        evaluation = {"model": "dama/tiny-llava", "preference_dataset_id": datasets[0]}
        evaluations = [client.post("/evaluations", json=evaluation).json()["id"]]
        # Never contacted: the API process delivers no webhook (workers do), and none runs here.
        webhooks = [client.post("/webhooks", json={"url": "https://hooks.example.com/fuzz"}).json()["id"]]
    with session_scope(db) as session:
        done = repository.get_job(session, job_id=jobs[1])
        assert done is not None
        repository.set_status(session, job=done, status="running")
        repository.set_status(session, job=done, status="succeeded", result={"steps": 2})
    archive = ArtifactStore(server.artifacts).adapter_archive(jobs[1])
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(b"not really an adapter, but a file to download")
    return {"datasets": datasets, "jobs": jobs, "evaluations": evaluations, "webhooks": webhooks}


def _config(ids: dict[str, list[str]]) -> str:
    """schemathesis.toml: the known ids in place of generated ones in most requests (the rest stay random)."""
    lines = ["[cache]\nenabled = false"]  # no state kept in the checkout between runs
    lines += [f"[dictionaries.{name}]\nvalues = {json.dumps(values)}" for name, values in ids.items()]
    lines.append("[parameters]")
    for field, name in (
        ("path.dataset_id", "datasets"),
        ("path.job_id", "jobs"),
        ("path.evaluation_id", "evaluations"),
        ("path.webhook_id", "webhooks"),
        ("body.dataset_id", "datasets"),
        ("body.preference_dataset_id", "datasets"),
        ("body.adapter_job_id", "jobs"),
    ):
        lines.append(f'"{field}" = {{ dictionary = "{name}", probability = 0.7 }}')
    return "\n".join(lines) + "\n"


def _forget_webhooks(db: sessionmaker[Session], key: str) -> int:
    """Delete the fuzzing tenant's webhook endpoints (no later test's worker may send to a fuzzed URL); returns
    how many delivery attempts they had."""
    with session_scope(db) as session:
        tenant = repository.tenant_for_key(session, key=key, pepper=PEPPER)
        assert tenant is not None
        mine = select(WebhookEndpoint.id).where(WebhookEndpoint.tenant_id == tenant.id)
        attempts = session.scalar(
            select(func.count())
            .select_from(WebhookAttempt)
            .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
            .where(WebhookDelivery.endpoint_id.in_(mine))
        )
        session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant.id))
    return int(attempts or 0)


def test_fuzzing_the_openapi_document_finds_no_5xx(
    fuzz_server: ApiServer, db: sessionmaker[Session], demo_archive: bytes, tmp_path: Path
) -> None:
    key = create_key(db, f"fuzz-{secrets.token_hex(3)}")
    config = tmp_path / "schemathesis.toml"
    config.write_text(_config(_known_ids(fuzz_server, key, db, demo_archive)))
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{fuzz_server.url}/openapi.json",
        "--checks",
        CHECKS,
        "--header",
        f"Authorization: Bearer {key}",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-time",
        str(FUZZ_SECONDS),
        "--max-examples",
        "60",
        "--seed",
        str(SEED),
        # One worker thread: with two, hypothesis' ast.parse in schemathesis' threads once died with
        # "SystemError: AST constructor recursion depth mismatch" (a CPython 3.11 thread race, not the API).
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
    ]
    try:
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 60)
    finally:
        attempts = _forget_webhooks(db, key)
    assert attempts == 0, "the API process sent webhooks: only workers may"
    summary = run.stdout[-6000:]
    egress = Path(fuzz_server.env["DAMA_TEST_EGRESS_LOG"])
    assert not egress.exists(), f"the API tried to reach beyond the loopback address:\n{egress.read_text()}"
    assert run.returncode == 0, f"schemathesis found problems:\n{summary}\n{run.stderr[-3000:]}"
    cases = re.search(r"(\d+) generated", run.stdout)
    assert cases is not None and int(cases.group(1)) >= min(1000, 10 * FUZZ_SECONDS), summary  # it really ran
    print(summary)  # the figures (operations, test cases, failures) for the log
