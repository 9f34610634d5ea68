"""The SDK's retry policy against a real local HTTP server that answers 429 and 503 before succeeding."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dama_client import (
    APIConnectionError,
    ChecksumError,
    Client,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
)

JOB = {
    "id": "job_0194b1c2d3e4a1b2c3d4e5f6",
    "object": "job",
    "kind": "training",
    "status": "queued",
    "stage": None,
    "step": 0,
    "total_steps": None,
    "progress": 0.0,
    "percent": 0.0,
    "eta_seconds": None,
    "error": None,
    "attempts": 0,
    "dataset_id": "ds_1",
    "queue": "default",
    "spec": {"model": "dama/tiny-llava", "dataset_id": "ds_1"},
    "result": None,
    "created_at": "2025-01-31T12:00:00Z",
    "started_at": None,
    "finished_at": None,
}


DROP = 0  # a scripted "answer" that closes the connection instead


class Script:
    """What the server answers, in order (the last answer repeats), and what it received."""

    def __init__(self, answers: list[tuple[int, dict[str, str], Any]]) -> None:
        self.answers = answers
        self.requests: list[dict[str, Any]] = []
        self.times: list[float] = []


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            script.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            script.times.append(time.monotonic())
            status, headers, payload = script.answers[min(len(script.requests), len(script.answers)) - 1]
            if status == DROP:  # read the request, then hang up without an answer
                self.close_connection = True
                return
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *_args: Any) -> None:
            pass

    return Handler


def _error(status: int, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": error_type, "code": code, "message": f"{code} happened", "param": param}}


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(script: Script) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_create_retries_429_and_503_with_one_idempotency_key(serve: Any) -> None:
    script = Script(
        [
            (429, {"Retry-After": "1"}, _error(429, "rate_limit_error", "rate_limited")),
            (503, {}, _error(503, "service_unavailable_error", "broker_unavailable")),
            (201, {}, JOB),
        ]
    )
    with Client(serve(script), "dama_test", backoff_s=0.05) as client:
        job = client.jobs.create(model="dama/tiny-llava", dataset_id="ds_1", method="dama")
    assert job.id == JOB["id"] and job.status == "queued"
    assert len(script.requests) == 3
    keys = {request["headers"]["Idempotency-Key"] for request in script.requests}
    assert len(keys) == 1 and next(iter(keys)).startswith("dama-client-")
    assert all(request["headers"]["Authorization"] == "Bearer dama_test" for request in script.requests)
    assert {json.loads(request["body"])["method"] for request in script.requests} == {"dama"}
    # Retry-After: 1 was honoured; the 503 retry waited only the short backoff.
    assert script.times[1] - script.times[0] >= 0.95
    assert script.times[2] - script.times[1] < 0.9


def test_each_create_call_has_its_own_key(serve: Any) -> None:
    script = Script([(201, {}, JOB)])
    with Client(serve(script), "k") as client:
        client.jobs.create(model="m", dataset_id="ds_1")
        client.jobs.create(model="m", dataset_id="ds_1")
        client.jobs.create(model="m", dataset_id="ds_1", idempotency_key="mine")
    keys = [request["headers"]["Idempotency-Key"] for request in script.requests]
    assert len(set(keys)) == 3 and keys[2] == "mine"


def test_upload_retry_sends_the_whole_file_again(serve: Any, tmp_path: Path) -> None:
    dataset = {
        "id": "ds_1",
        "name": "train.jsonl",
        "format": "trl",
        "row_count": 1,
        "image_count": 0,
        "size_bytes": 5,
        "sha256": "0" * 64,
        "validation": {},
        "created_at": "2025-01-31T12:00:00Z",
    }
    script = Script([(503, {"Retry-After": "0"}, _error(503, "service_unavailable_error", "x")), (201, {}, dataset)])
    file = tmp_path / "train.jsonl"
    file.write_bytes(b"x" * 300_000)
    seen: list[int] = []
    with Client(serve(script), "k") as client:
        result = client.datasets.upload(file, progress=lambda done, _total: seen.append(done))
    assert result.id == "ds_1"
    for request in script.requests:  # each attempt carries the whole file (multipart boundaries differ)
        assert request["body"].count(b"x" * 300_000) == 1 and b'filename="train.jsonl"' in request["body"]
    assert len({request["headers"]["Idempotency-Key"] for request in script.requests}) == 1
    assert seen[-1] == 300_000


def test_errors_are_typed_after_the_retries(serve: Any) -> None:
    bad = _error(422, "invalid_request_error", "validation_error", "hyperparameters.learning_rate")
    script = Script([(422, {}, bad)])
    with Client(serve(script), "k", max_retries=2, backoff_s=0.01) as client:
        with pytest.raises(InvalidRequestError) as caught:
            client.jobs.create(model="m", dataset_id="ds_1")
        assert len(script.requests) == 1  # a 4xx other than 429 is not retried
        assert (caught.value.status_code, caught.value.type, caught.value.code) == (
            422,
            "invalid_request_error",
            "validation_error",
        )
        assert caught.value.param == "hyperparameters.learning_rate"
        assert caught.value.message == "validation_error happened"

    busy = Script([(429, {"Retry-After": "0"}, _error(429, "rate_limit_error", "rate_limited"))])
    with Client(serve(busy), "k", max_retries=2, backoff_s=0.01) as client, pytest.raises(RateLimitError):
        client.jobs.get("job_1")
    assert len(busy.requests) == 3

    down = Script([(503, {}, _error(503, "service_unavailable_error", "db"))])
    with Client(serve(down), "k", max_retries=1, backoff_s=0.01) as client, pytest.raises(ServiceUnavailableError):
        client.models.list()
    assert len(down.requests) == 2


def test_a_download_that_does_not_match_its_sha256_is_refused(serve: Any, tmp_path: Path) -> None:
    script = Script([(200, {"X-Content-SHA256": "0" * 64}, {"not": "the announced bytes"})])
    with Client(serve(script), "k") as client, pytest.raises(ChecksumError):
        client.jobs.download("job_1", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_a_dropped_create_is_resent_only_with_its_idempotency_key(serve: Any) -> None:
    jobs = Script([(DROP, {}, None), (201, {}, JOB)])
    with Client(serve(jobs), "k", backoff_s=0.01) as client:
        assert client.jobs.create(model="m", dataset_id="ds_1").id == JOB["id"]
    assert len(jobs.requests) == 2 and len({r["headers"]["Idempotency-Key"] for r in jobs.requests}) == 1

    # POST /webhooks takes no Idempotency-Key: the server may have made the endpoint, so it is not sent twice.
    hooks = Script([(DROP, {}, None), (201, {}, {})])
    with Client(serve(hooks), "k", backoff_s=0.01) as client, pytest.raises(APIConnectionError):
        client.webhooks.create(url="https://example.com/hook")
    assert len(hooks.requests) == 1


def test_connection_errors_are_retried_then_raised() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed when the block ends: nothing listens there
    started = time.monotonic()
    client = Client(f"http://127.0.0.1:{port}", "k", max_retries=2, backoff_s=0.1)
    with client, pytest.raises(APIConnectionError):
        client.health.live()
    assert time.monotonic() - started >= 0.1  # it backed off between tries


def test_configuration_from_the_environment(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script([(200, {}, {"status": "ok"})])
    monkeypatch.setenv("DAMA_API_URL", serve(script))
    monkeypatch.setenv("DAMA_API_KEY", "dama_from_env")
    with Client() as client:
        assert client.health.live().status == "ok"
    assert script.requests[0]["headers"]["Authorization"] == "Bearer dama_from_env"


def test_a_redirected_download_comes_from_the_link_without_the_key(serve: Any, tmp_path: Path) -> None:
    # DAMA_DOWNLOAD_MODE=redirect: the API answers 307 to a presigned object-store link, the checksum on the 307.
    stored = {"the": "archive bytes"}
    body = json.dumps(stored).encode()
    store = Script([(200, {}, stored)])
    link = serve(store) + "/bucket/jobs/job_1/adapter.tar.gz?X-Amz-Signature=abc"
    api = Script([(307, {"Location": link, "X-Content-SHA256": hashlib.sha256(body).hexdigest()}, {})])
    with Client(serve(api), "secret-key") as client:
        archive = client.jobs.download("job_1", tmp_path, unpack=False)
    assert archive.read_bytes() == body
    assert store.requests[0]["path"] == "/bucket/jobs/job_1/adapter.tar.gz?X-Amz-Signature=abc"
    assert "Authorization" not in store.requests[0]["headers"]  # the key never goes to the store
    assert api.requests[0]["headers"]["Authorization"] == "Bearer secret-key"

    forged = Script([(307, {"Location": link, "X-Content-SHA256": "0" * 64}, {})])
    with Client(serve(forged), "secret-key") as client, pytest.raises(ChecksumError):
        client.jobs.download("job_1", tmp_path / "again", unpack=False)
