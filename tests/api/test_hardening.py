"""What abuse and fault testing broke (issue 12), against real servers: concurrent idempotent submissions, NUL
characters and out-of-range cursors, oversized JSON bodies, guessed API keys, tenant names, and server file paths
in what tenants read."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from api.app import create_app
from jobstore import repository
from jobstore.db import session_scope
from jobstore.models import IdempotencyKey, Job, JobEvent, Tenant
from jobstore.settings import Settings
from tests.api.conftest import (
    PEPPER,
    ROOT,
    ApiServer,
    _server_env,
    _start,
    assert_error,
    create_key,
    zip_bytes,
)

THROTTLE = 4  # invalid keys per minute per address on the throttled server


def _spec(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    return {"model": "dama/tiny-llava", "dataset_id": dataset_id, "hyperparameters": {"max_steps": 4}} | overrides


def _post_all(server: ApiServer, key: str, bodies: list[dict[str, Any]], idempotency_key: str) -> list[httpx.Response]:
    """Every body POSTed to /jobs at once, each on its own connection."""

    def post(body: dict[str, Any]) -> httpx.Response:
        with server.client(key) as client:
            return client.post("/jobs", json=body, headers={"Idempotency-Key": idempotency_key})

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_concurrent_posts_with_one_idempotency_key_make_one_job(
    api_server: ApiServer, key1: str, dataset1: dict[str, Any], db: sessionmaker[Session]
) -> None:
    same = _post_all(api_server, key1, [_spec(dataset1["id"])] * 20, "race-same-" + secrets.token_hex(4))
    assert [r.status_code for r in same if r.status_code not in (200, 201)] == [], [r.text for r in same]
    assert sorted(r.status_code for r in same).count(201) == 1
    assert len({r.json()["id"] for r in same}) == 1

    key = "race-different-" + secrets.token_hex(4)
    bodies = [_spec(dataset1["id"], suffix=f"variant-{i}") for i in range(20)]
    different = _post_all(api_server, key1, bodies, key)
    statuses = sorted(r.status_code for r in different)
    assert statuses == [201] + [409] * 19, [r.text for r in different if r.status_code >= 500]
    codes = {r.json()["error"]["code"] for r in different if r.status_code == 409}
    assert codes <= {"idempotency_key_reused", "idempotency_conflict"}, codes
    with db() as session:
        created = session.scalar(select(IdempotencyKey.resource_id).where(IdempotencyKey.key == key))
        winner = next(r.json() for r in different if r.status_code == 201)
        assert created == winner["id"]
        jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.spec["suffix"].as_string().like("variant-%"))
        )
        assert jobs == 1


def test_nul_characters_are_refused_with_the_parameter(
    client1: httpx.Client, dataset1: dict[str, Any], api_server: ApiServer
) -> None:
    job = client1.post("/jobs", json=_spec(dataset1["id"])).json()
    for path, param in (
        ("/jobs/job_%00abc", None),
        ("/datasets/ds_%00", None),
        (f"/jobs/{job['id']}/events?after=1&x=%00", "x"),
        ("/jobs?after=job_%00", "after"),
        ("/datasets?after=%00", "after"),
        (f"/jobs/{job['id']}/metrics?keys=loss,re%00ward", "keys"),
    ):
        error = assert_error(client1.get(path), 400, "invalid_characters")
        assert error["param"] == param and "NUL" in error["message"], (path, error)
    for body, param in (
        (_spec(dataset1["id"], model="dama/tiny\u0000llava"), "model"),
        (_spec(dataset1["id"], lora={"target_modules": ["q_proj", "v\u0000"]}), "lora.target_modules"),
        (_spec(dataset1["id"], suffix="a\u0000"), "suffix"),
        (_spec("ds_\u0000"), "dataset_id"),
    ):
        error = assert_error(client1.post("/jobs", json=body), 422, "validation_error")
        assert error["param"] == param and "NUL" in error["message"], error
    evaluation = {"model": "dama/tiny-llava", "preference_dataset_id": "ds_\u0000"}
    assert_error(client1.post("/evaluations", json=evaluation), 422, "validation_error")
    # A form field of an upload: refused, never a 500.
    upload = client1.post("/datasets", files={"file": ("a.jsonl", b"{}\n")}, data={"name": "x\x00y"})
    assert 400 <= upload.status_code < 500, upload.text


def test_event_cursors_beyond_the_store_are_refused_before_the_stream(
    client1: httpx.Client, dataset1: dict[str, Any]
) -> None:
    job = client1.post("/jobs", json=_spec(dataset1["id"])).json()
    huge = "99999999999999999999"
    error = assert_error(client1.get(f"/jobs/{job['id']}/events?after={huge}"), 422, "validation_error")
    assert error["param"] == "after"
    stream_headers = {"Accept": "text/event-stream"}
    with client1.stream("GET", f"/jobs/{job['id']}/events?after={huge}", headers=stream_headers) as response:
        assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    for value in (huge, str(2**31)):
        headers = stream_headers | {"Last-Event-ID": value}
        with client1.stream("GET", f"/jobs/{job['id']}/events", headers=headers) as response:
            response.read()
            error = assert_error(response, 422, "invalid_last_event_id")
            assert error["param"] == "Last-Event-ID"
    # The largest seq the store holds still works (an empty page).
    page = client1.get(f"/jobs/{job['id']}/events?after={2**31 - 1}").json()
    assert page["data"] == [] and page["has_more"] is False


def test_json_bodies_and_spec_lists_are_bounded(client1: httpx.Client, dataset1: dict[str, Any]) -> None:
    spec = _spec(dataset1["id"], lora={"target_modules": ["q_proj"] * 65})
    error = assert_error(client1.post("/jobs", json=spec), 422, "validation_error")
    assert error["param"] == "lora.target_modules" and "64" in error["message"]
    long_name = _spec(dataset1["id"], lora={"target_modules": ["q" * 201]})
    assert assert_error(client1.post("/jobs", json=long_name), 422)["param"] == "lora.target_modules[0]"

    # Over the default DAMA_MAX_JSON_BODY_BYTES (1 MiB): refused by its Content-Length, and chunked without one.
    big = json.dumps(_spec(dataset1["id"], suffix="x" * (1024**2 + 10))).encode()
    headers = {"Content-Type": "application/json"}
    for content in (big, iter([big[i : i + 65536] for i in range(0, len(big), 65536)])):
        error = assert_error(client1.post("/jobs", content=content, headers=headers), 413, "request_too_large")
        assert "DAMA_MAX_JSON_BODY_BYTES" in error["message"] and error["type"] == "request_too_large"
    not_json = assert_error(client1.post("/jobs", content=b"{nope", headers=headers), 400, "invalid_json")
    assert not_json["param"] is None


@pytest.fixture(scope="module")
def throttled_server(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("api-throttled")
    queue = f"test-api-{secrets.token_hex(4)}"
    env = _server_env(pg_url, redis_url, tmp / "artifacts", queue, DAMA_AUTH_FAILURE_LIMIT=f"{THROTTLE}/minute")
    yield from _start(tmp, env, queue)


def test_invalid_keys_are_throttled_per_address(throttled_server: ApiServer, db: sessionmaker[Session]) -> None:
    good = create_key(db, f"throttle-{secrets.token_hex(3)}")
    with throttled_server.client("dama_guessed-" + secrets.token_hex(8)) as guesser:
        for _ in range(THROTTLE):
            assert_error(guesser.get("/jobs"), 401, "invalid_api_key")
        refused = guesser.get("/jobs")
        error = assert_error(refused, 429, "too_many_failed_authentications")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60 and f"{THROTTLE} per minute" in error["message"]
        assert_error(guesser.get("/jobs"), 429, "too_many_failed_authentications")
    # Requests without a key cost no lookup and are not throttled; another address is not held back.
    assert_error(httpx.get(f"{throttled_server.url}/jobs"), 401, "missing_api_key")
    other_address = httpx.HTTPTransport(local_address="127.0.0.2")
    with throttled_server.client(good, transport=other_address) as other:
        assert other.get("/jobs").status_code == 200
        with throttled_server.client("dama_wrong", transport=httpx.HTTPTransport(local_address="127.0.0.2")) as bad:
            assert_error(bad.get("/jobs"), 401, "invalid_api_key")


def test_a_throttled_address_costs_no_database_query(pg_url: str, tmp_path: Any) -> None:
    """In process (to count the statements the app's engine runs) on the real Postgres."""
    settings = Settings(
        database_url=pg_url,
        broker_url="redis://127.0.0.1:1/0",
        artifacts_dir=tmp_path / "artifacts",
        home=tmp_path / "home",
        api_key_pepper=PEPPER,
        auth_failure_limit="2/minute",
    )
    app = create_app(settings)
    statements: list[str] = []
    event.listen(app.state.services.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with TestClient(app, headers={"Authorization": "Bearer dama_guess"}) as client:
        for _ in range(2):
            assert_error(client.get("/jobs"), 401, "invalid_api_key")
        assert any("api_keys" in statement for statement in statements)
        statements.clear()
        for _ in range(5):
            assert_error(client.get("/jobs"), 429, "too_many_failed_authentications")
        assert statements == []


def test_tenant_names_are_checked(db: sessionmaker[Session], api_server: ApiServer) -> None:
    for name in ("", " ", "alpha ", "Alpha", "-alpha", "al\x01pha", "al\x00pha", "é", "a" * 65, "a b"):
        with session_scope(db) as session, pytest.raises(ValueError, match="is not valid: use 1-64 characters"):
            repository.get_or_create_tenant(session, name=name)
    for name in ("a", "alpha.team-1_x", "0" + "a" * 63):
        with session_scope(db) as session:
            assert repository.get_or_create_tenant(session, name=name).name == name
    # Unique regardless of case: an older mixed-case name is the same tenant, and no second one can be stored.
    legacy = f"Legacy-{secrets.token_hex(3)}"
    with session_scope(db) as session:
        session.add(Tenant(name=legacy))
    with session_scope(db) as session:
        assert repository.get_or_create_tenant(session, name=legacy.lower()).name == legacy
    with pytest.raises(IntegrityError), session_scope(db) as session:
        session.add(Tenant(name=legacy.upper()))
        session.flush()

    for name in ("a" * 250, "alpha "):
        result = subprocess.run(
            [sys.executable, "-m", "api.cli", "admin", "create-key", "--tenant", name],
            cwd=ROOT,
            env=api_server.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and result.stdout == "", result
        assert "is not valid: use 1-64 characters of lower-case letters" in result.stderr, result.stderr
        assert "dama migrate" not in result.stderr


ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:[\w.-]+/)+")


def test_server_paths_never_reach_tenants(
    client1: httpx.Client, dataset1: dict[str, Any], db: sessionmaker[Session], api_server: ApiServer
) -> None:
    root = str(api_server.artifacts)
    data_file = f"{root}/datasets/{dataset1['id']}/train.jsonl"
    job = client1.post("/jobs", json=_spec(dataset1["id"])).json()
    with session_scope(db) as session:
        row = session.get(Job, job["id"])
        assert row is not None
        repository.add_events(session, job_id=row.id, events=[("log", f"read {data_file}", {"file": data_file})])
        repository.set_status(session, job=row, status="running")
        repository.set_status(
            session,
            job=row,
            status="failed",
            error_kind=repository.ErrorKind.system_error,
            error_message=f'OSError: disk full\n  File "{sys.prefix}/lib/site-packages/x.py", line 3\n{data_file}',
        )
        # A row written before redaction existed is shortened when it is read.
        session.add(JobEvent(job_id=row.id, seq=999, type="log", message=f"saved {root}/runs/x/ckpt", data=None))
    failed = client1.get(f"/jobs/{job['id']}").json()
    events = client1.get(f"/jobs/{job['id']}/events").json()["data"]
    shown = json.dumps([failed, events])
    assert root not in shown and sys.prefix not in shown and not ABSOLUTE.search(shown), shown
    assert ".../train.jsonl" in failed["error"]["message"] and ".../x.py" in failed["error"]["message"]
    assert events[-1]["message"] == "saved .../ckpt"

    # A path the tenant wrote itself (a model folder on the workers) is its own: it stays.
    own = client1.post("/jobs", json=_spec(dataset1["id"], model="/models/team/llava-ours")).json()
    with session_scope(db) as session:
        row = session.get(Job, own["id"])
        assert row is not None
        repository.set_status(session, job=row, status="running")
        message = f"model '/models/team/llava-ours' could not be loaded: no config.json in {root}/cache/x"
        failed_error = repository.ErrorKind.user_error
        repository.set_status(session, job=row, status="failed", error_kind=failed_error, error_message=message)
    shown_error = client1.get(f"/jobs/{own['id']}").json()["error"]["message"]
    assert shown_error == "model '/models/team/llava-ours' could not be loaded: no config.json in .../x"


def test_the_openapi_document_lists_every_error(api_server: ApiServer) -> None:
    paths = httpx.get(f"{api_server.url}/openapi.json").json()["paths"]
    assert "401" in paths["/models"]["get"]["responses"]
    assert "429" in paths["/models"]["get"]["responses"]
    create = paths["/jobs"]["post"]["responses"]
    assert "invalid_json" in create["400"]["description"] and "413" in create
    assert "413" not in paths["/jobs"]["get"]["responses"]
    assert "invalid_characters" in paths["/jobs/{job_id}"]["get"]["responses"]["400"]["description"]


def test_upload_messages_name_the_real_problem(client1: httpx.Client, demo_archive: bytes) -> None:
    # JSON nested deeper than the parser recurses: named as such, not as "a corrupt archive or image?".
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "chosen": "a", "rejected": "b"}\n'
    for name, content in (("deep.jsonl", deep), ("deep.json", b"[" * 100_000 + b"]" * 100_000)):
        response = client1.post("/datasets", files={"file": (name, content)})
        assert response.status_code in (400, 422), response.text
        message = response.json()["error"]["message"]
        assert "too deeply" in message and "corrupt" not in message, message

    # An image far over the pixel limit: the service's limit is quoted, not Pillow's own.
    with zipfile.ZipFile(io.BytesIO(demo_archive)) as original:
        members = {item: original.read(item) for item in original.namelist()}
    first_image = sorted(name for name in members if name.startswith("images/"))[0]
    huge = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(huge, format="PNG")  # 400 M pixels in 48 KB
    members[first_image] = huge.getvalue()
    response = client1.post("/datasets", files={"file": ("big.zip", zip_bytes(members))})
    error = assert_error(response, 422, "invalid_rows")
    assert "400000000 pixels, over max_image_pixels=16777216" in error["message"], error
    assert "178956970" not in response.text


def test_a_client_leaving_mid_upload_is_not_an_application_error(api_server: ApiServer, key1: str) -> None:
    log = api_server.artifacts.parent / "server.log"
    seen = len(log.read_bytes())
    boundary = "----dama-test"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'.encode()
    port = int(api_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(
            (
                f"POST /datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key1}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 10000000\r\n\r\n"
            ).encode()
            + head
            + b"x" * 200_000
        )
        time.sleep(0.5)
    time.sleep(1.0)
    assert httpx.get(f"{api_server.url}/healthz").status_code == 200
    written = log.read_bytes()[seen:].decode(errors="replace")
    assert "Exception in ASGI application" not in written and "Traceback" not in written, written
    assert not any(name.startswith("tmp-") for name in os.listdir(api_server.artifacts / "uploads"))
