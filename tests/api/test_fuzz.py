"""A bounded fuzzing run of the OpenAPI document (schemathesis) against a real uvicorn on Postgres and Redis.

Every check schemathesis has (status codes, content types, response schemas and headers,
schema-valid requests accepted, schema-violating ones rejected, 405 with the right ``Allow``, auth not ignored,
use after delete...) runs on every operation, with a valid API key: the document's examples, its boundary values
and generated requests for ``FUZZ_SECONDS``, then the stateful phase (sequences that follow the document's links
from each create) for ``STATEFUL_SECONDS``. The fuzzing tenant owns real objects, whose ids replace generated ones
in most requests; the only checks left out are :data:`tests.api.fuzzing.EXCLUSIONS`, each with its reason. The
server runs in a process that may reach the loopback address only (``loopback_only.py``): nothing a fuzzed request
does may make the service talk to the outside world. A long randomized run: ``benchmarks/fuzz_api.py``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from api.openapi import RULES_HEADING
from jobstore import repository
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tests.api import fuzzing
from tests.api.conftest import ROOT, SECRET, ApiServer, _server_env, _start, create_key, start_infer
from tests.conftest import migrated_database

# The run's budget: with start-up, seeding and teardown the test stays under 3 minutes. Longer runs by hand:
# DAMA_TEST_FUZZ_SECONDS=1800 (and another DAMA_TEST_FUZZ_SEED), or benchmarks/fuzz_api.py.
FUZZ_SECONDS = int(os.environ.get("DAMA_TEST_FUZZ_SECONDS", "70"))
STATEFUL_SECONDS = int(os.environ.get("DAMA_TEST_FUZZ_STATEFUL_SECONDS", "35"))
SEED = int(os.environ.get("DAMA_TEST_FUZZ_SEED", "12"))  # the same requests on every CI run


@pytest.fixture(scope="module")
def fuzz_pg_url() -> Iterator[str]:
    """A database of the fuzzing server's own: the session's workers (other tests') run a webhook dispatcher over
    their database, which would send the fuzzed endpoints' deliveries; here only the API process could."""
    with migrated_database("dama_fuzz") as url:
        yield url


@pytest.fixture(scope="module")
def fuzz_db(fuzz_pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(fuzz_pg_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def fuzz_server(fuzz_pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API with a real inference backend (``dama infer``, the built-in tiny models, answers of at most
    DAMA_CHAT_MAX_TOKENS tokens), so fuzzed chat requests that pass the API's checks are answered."""
    tmp = tmp_path_factory.mktemp("api-fuzz")
    queue = f"test-fuzz-{secrets.token_hex(4)}"  # no worker consumes it: fuzzed jobs stay queued
    cap = {"DAMA_CHAT_MAX_TOKENS": fuzzing.SERVER_SETTINGS["DAMA_CHAT_MAX_TOKENS"]}
    for infer in start_infer(tmp, artifacts=tmp / "artifacts", models=tmp / "models", **cap):
        env = _server_env(
            fuzz_pg_url,
            redis_url,
            tmp / "artifacts",
            queue,
            DAMA_TEST_EGRESS_LOG=str(tmp / "egress.log"),
            DAMA_INFERENCE_URL=f"{infer.url}/v1",
            DAMA_INFERENCE_SECRET=SECRET,
            **fuzzing.SERVER_SETTINGS,
        )
        yield from _start(tmp, env, queue, runner=(str(Path(__file__).with_name("loopback_only.py")),))


def _forget_webhooks(db: sessionmaker[Session], tenant_name: str) -> int:
    """Delete the fuzzing tenant's webhook endpoints (no later test's worker may send to a fuzzed URL); returns
    how many delivery attempts they had."""
    with session_scope(db) as session:
        tenant = repository.tenant_by_name(session, name=tenant_name)
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


def test_fuzzing_the_openapi_document_finds_nothing(
    fuzz_server: ApiServer, fuzz_db: sessionmaker[Session], demo_archive: bytes, tmp_path: Path
) -> None:
    db = fuzz_db
    tenant = f"fuzz-{secrets.token_hex(3)}"
    key = create_key(db, tenant)
    config = tmp_path / "schemathesis.toml"
    config.write_text(fuzzing.config(fuzzing.known_ids(fuzz_server, key, db, demo_archive)))
    runs = []
    try:
        # Two runs, each with its own time: in one, the fuzzing phase could use up the stateful phase's time.
        for phases, seconds in zip(fuzzing.RUNS, (FUZZ_SECONDS, STATEFUL_SECONDS), strict=True):
            command = fuzzing.command(
                fuzz_server.url, key, config, seed=SEED, max_examples=60, max_time_s=seconds, phases=phases
            )
            runs.append(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60))
    finally:
        attempts = _forget_webhooks(db, tenant)
    assert attempts == 0, "the API process sent webhooks: only workers may"
    egress = Path(fuzz_server.env["DAMA_TEST_EGRESS_LOG"])
    assert not egress.exists(), f"the API tried to reach beyond the loopback address:\n{egress.read_text()}"
    for run in runs:
        summary = run.stdout[-8000:]
        assert run.returncode == 0, f"schemathesis found problems (seed {SEED}):\n{summary}\n{run.stderr[-3000:]}"
        print(summary)  # the figures (operations, test cases, failures) for the log
    fuzzed, stateful = runs
    with fuzz_server.client(key) as client:  # a key may revoke itself: had the fuzzer done so, it tested nothing
        assert client.get("/keys").status_code == 200, "the fuzzing key was revoked during the run"
    # It really ran: every check costs requests of its own (ignored_auth, unsupported_method...), so a case is
    # several requests; 5 a second is what a 2-core machine shared with other test runs reaches.
    assert fuzzing.cases_generated(fuzzed.stdout) >= 5 * FUZZ_SECONDS, fuzzed.stdout[-3000:]
    assert "Stateful" in stateful.stdout and "Scenarios:" in stateful.stdout, stateful.stdout[-3000:]


def test_each_exclusion_is_a_rule_the_document_states(tmp_path: Path) -> None:
    """Every check left out is left out on an operation whose description lists the rules its schema cannot
    state, and on no operation twice."""
    from api.app import create_app
    from jobstore.settings import Settings

    paths = create_app(Settings(home=tmp_path)).openapi()["paths"]
    seen = set()
    for exclusion in fuzzing.EXCLUSIONS:
        method, path = exclusion.operation.split(" ", 1)
        assert RULES_HEADING in paths[path][method.lower()]["description"], exclusion.operation
        assert exclusion.reason and (exclusion.check, exclusion.operation) not in seen
        seen.add((exclusion.check, exclusion.operation))
