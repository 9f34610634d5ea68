"""``dama infer`` (worker.infer): the OpenAI-compatible backend over HTTP, on the built-in tiny LLaVA.

Most tests use the app in process (TestClient); the overload and disconnect test runs a real uvicorn server in a
thread and drops a raw socket, as a client that goes away does.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.data.rows import ImageSource
from dama_engine.forward.generation import GenerationRequest, GenerationSettings, generate
from dama_engine.training import ADAPTER_DIR, checkpoint_dir
from jobstore.artifacts import FilesystemStore, pack_folder
from jobstore.settings import Settings
from tests.engine.conftest import png_bytes
from tests.engine.test_serving import data_uri, make_lora_adapter
from worker.engine_config import adapter_folder, ensure_tiny_model, model_cache_root
from worker.infer import InferenceBackend, ModelResolver, create_app, main

SECRET = "test-secret-0123"
AUTH = {"Authorization": f"Bearer {SECRET}"}
MODEL = "dama/tiny-llava"
JOB = "job_0190aa01bb02cc03dd04ee05"
FULL_JOB = "job_0190aa01bb02cc03dd04ee06"
EXPORT = "exp_0190aa01bb02cc03dd04ee07"
PROMPT = "Describe the image."
PNG = png_bytes((200, 40, 40), (40, 30))


def _settings(root: Path, **values: Any) -> Settings:
    defaults: dict[str, Any] = {
        "home": root,
        "artifacts_dir": root / "artifacts",
        "artifacts_url": None,
        "model_cache_dir": root / "models",
        "inference_secret": SECRET,
        "chat_max_tokens": 64,
        "infer_batch_window_ms": 5,
    }
    return Settings(**{**defaults, **values})


def _messages(prompt: str = PROMPT) -> list[dict[str, Any]]:
    image = {"type": "image_url", "image_url": {"url": data_uri(PNG)}}
    return [{"role": "user", "content": [image, {"type": "text", "text": prompt}]}]


def _body(model: str = MODEL, **values: Any) -> dict[str, Any]:
    return {"model": model, "messages": _messages(), "max_tokens": 6, "temperature": 0, **values}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infer")


@pytest.fixture(scope="module")
def settings(root: Path) -> Settings:
    """The server's settings, with a training job's adapter, a kept checkpoint and a full fine-tune in its store."""
    settings = _settings(root)
    model_dir = ensure_tiny_model("llava", model_cache_root(settings))
    store = FilesystemStore(settings.resolved_artifacts_dir)
    make_lora_adapter(model_dir, adapter_folder(store, JOB), base_name=MODEL, seed=1)
    make_lora_adapter(model_dir, checkpoint_dir(store.run_dir(JOB), 5) / ADAPTER_DIR, base_name=MODEL, seed=2)
    shutil.copytree(model_dir, adapter_folder(store, FULL_JOB))  # a full fine-tune: a model folder of its own
    return settings


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def _error(response: httpx.Response, status: int, code: str | None, root: Path) -> dict[str, Any]:
    """The OpenAI error body of ``response``, checked: its status and code, and no server path in it."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert str(root) not in response.text and "/tmp" not in response.text
    return dict(error)


def _evaluation_answer(client: TestClient, settings: Settings, max_tokens: int, adapter: Path | None = None) -> str:
    """What an evaluation job generates for the same image and prompt (the engine's generate, greedy), on the
    server's device."""
    model_dir = ensure_tiny_model("llava", model_cache_root(settings))
    model = AutoModelForImageTextToText.from_pretrained(model_dir).to(_backend(client).cache.device).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    request = GenerationRequest.from_prompt(PROMPT, [ImageSource(data=PNG)])
    processor = AutoProcessor.from_pretrained(model_dir)
    return generate(model, processor, [request], GenerationSettings(max_new_tokens=max_tokens))[0]


def _backend(client: TestClient) -> InferenceBackend:
    app = client.app
    assert isinstance(app, FastAPI)
    backend: InferenceBackend = app.state.backend
    return backend


@contextmanager
def _generate_fails(backend: InferenceBackend) -> Iterator[None]:
    """The model's generate raises for the block (as a device running out of memory would)."""
    lease = backend.acquire(MODEL)
    model = lease.loaded.model
    backend.cache.release(lease)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"out of memory in {backend.settings.home}")

    model.generate = broken
    try:
        yield
    finally:
        del model.generate


def _stream_events(response: httpx.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- the routes -------------------------------------------------------------------------------------------------
def test_health_is_open_and_every_v1_route_needs_the_secret(client: TestClient, root: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET}):
        response = client.post("/v1/chat/completions", json=_body(), headers=headers)
        error = _error(response, 401, "invalid_api_key", root)
        assert error["type"] == "authentication_error"
        _error(client.get("/v1/models", headers=headers), 401, "invalid_api_key", root)
    _error(client.get("/v1/nothing", headers=AUTH), 404, None, root)


def test_an_answer_is_the_evaluations_answer(client: TestClient, settings: Settings) -> None:
    """The same tiny model, image and prompt: the server's greedy answer is the evaluation's, to the character."""
    response = client.post("/v1/chat/completions", json=_body(max_tokens=8), headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": _evaluation_answer(client, settings, 8)}
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 8 and usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["prompt_tokens"] > 16  # the image's tokens and the prompt's
    models = client.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and MODEL in {model["id"] for model in models["data"]}


def test_a_stream_is_the_answer_in_pieces(client: TestClient) -> None:
    whole = client.post("/v1/chat/completions", json=_body(), headers=AUTH).json()
    options = {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=_body(**options), headers=AUTH) as response:
        assert response.status_code == 200
        events = _stream_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["id"] == chunks[0]["id"] for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-2]]
    assert texts and "".join(texts) == whole["choices"][0]["message"]["content"]  # (a late reader gets fewer pieces)
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    with client.stream("POST", "/v1/chat/completions", json=_body(stream=True), headers=AUTH) as response:
        plain = _stream_events(response)
    assert "usage" not in plain[-2] and plain[-1] == "[DONE]"


def test_a_failure_after_the_stream_started_is_its_last_event(client: TestClient, root: Path) -> None:
    with _generate_fails(_backend(client)):
        with client.stream("POST", "/v1/chat/completions", json=_body(stream=True), headers=AUTH) as response:
            assert response.status_code == 200  # the stream had started
            events = _stream_events(response)
        failed = client.post("/v1/chat/completions", json=_body(), headers=AUTH)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(events) == 2 and events[1]["error"]["code"] == "server_error"  # no [DONE] after an error
    assert str(root) not in json.dumps(events)
    _error(failed, 500, "server_error", root)
    assert client.post("/v1/chat/completions", json=_body(), headers=AUTH).status_code == 200  # and it goes on


def test_stop_strings_and_length_limits(client: TestClient) -> None:
    full = client.post("/v1/chat/completions", json=_body(max_tokens=12), headers=AUTH).json()
    text = full["choices"][0]["message"]["content"]
    stop = text.split()[1]
    cut = client.post("/v1/chat/completions", json=_body(max_tokens=12, stop=[stop]), headers=AUTH).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)].strip()
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] < 12
    body = {key: value for key, value in _body(max_completion_tokens=2).items() if key != "max_tokens"}
    short = client.post("/v1/chat/completions", json=body, headers=AUTH).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2
    assert text.startswith(short["choices"][0]["message"]["content"])


def test_jobs_answer_with_their_adapter_checkpoint_or_fine_tune(client: TestClient, settings: Settings) -> None:
    def answer(model: str) -> str:
        response = client.post("/v1/chat/completions", json=_body(model, max_tokens=8), headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        return str(response.json()["choices"][0]["message"]["content"])

    store = FilesystemStore(settings.resolved_artifacts_dir)
    base, tuned, checkpoint = answer(MODEL), answer(JOB), answer(f"{JOB}:5")
    assert tuned == _evaluation_answer(client, settings, 8, adapter_folder(store, JOB)) != base
    assert checkpoint == _evaluation_answer(client, settings, 8, checkpoint_dir(store.run_dir(JOB), 5) / ADAPTER_DIR)
    assert checkpoint not in (base, tuned)
    assert answer(MODEL) == base  # the base again, from inside the peft model with the adapters switched off
    assert answer(FULL_JOB) == base  # the full fine-tune here is a copy of the base
    names = {model["id"] for model in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert names == {MODEL, JOB, f"{JOB}:5", FULL_JOB}


def test_unknown_models_are_not_found(client: TestClient, root: Path) -> None:
    for model in ("job_0190ffffffffffffffffffff", f"{JOB}:6", "dama/tiny-unknown", str(root / "no" / "such" / "model")):
        error = _error(
            client.post("/v1/chat/completions", json=_body(model), headers=AUTH), 404, "model_not_found", root
        )
        assert error["param"] == "model"


def test_a_merged_export_answers_as_its_job(client: TestClient, settings: Settings, root: Path, tmp_path: Path) -> None:
    """A merged export's archive, as the export task packs it, is unpacked once into the server's scratch folder and
    answers as the job's adapter does; only ``exp_<id>@<job>/attempt-<n>`` of the store's export layout is loaded."""
    store = FilesystemStore(settings.resolved_artifacts_dir)
    model_dir = ensure_tiny_model("llava", model_cache_root(settings))
    merged = tmp_path / "model"
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    PeftModel.from_pretrained(base, adapter_folder(store, JOB)).merge_and_unload().save_pretrained(merged)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(merged)
    pack_folder(merged, store.export_archive(JOB, EXPORT, 2), gzip=False)

    def answer(model: str) -> str:
        response = client.post("/v1/chat/completions", json=_body(model, max_tokens=8), headers=AUTH)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    model = f"{EXPORT}@{JOB}/attempt-2"
    assert answer(model) == answer(JOB) != answer(MODEL)  # merging does not change the model
    unpacked = settings.resolved_scratch_dir / "infer-exports" / JOB / EXPORT / "attempt-2"
    assert (unpacked / "config.json").is_file() and not list(unpacked.parent.glob(".*"))  # no partial left
    # A tar whose member would land outside the folder is refused (tarfile's data filter), and nothing escapes.
    evil = store.export_archive(JOB, "exp_evil", 1)
    evil.parent.mkdir(parents=True)
    with tarfile.open(evil, "w") as bundle:
        for name in ("config.json", "../../escaped.json"):
            member = tarfile.TarInfo(name)
            member.size = 2
            bundle.addfile(member, io.BytesIO(b"{}"))
    for bad in (
        f"exp_evil@{JOB}/attempt-1",
        f"{EXPORT}@{JOB}/attempt-1",  # no such run
        f"{EXPORT}@{FULL_JOB}/attempt-2",  # another job's folder
        f"{EXPORT}@{JOB}/attempt-2/../../../adapter",
        f"{EXPORT}@{JOB}/../{JOB}/attempt-2",
        EXPORT,
    ):
        error = _error(client.post("/v1/chat/completions", json=_body(bad), headers=AUTH), 404, "model_not_found", root)
        assert error["param"] == "model", bad
    assert not list(settings.resolved_scratch_dir.rglob("escaped.json"))

    # At most DAMA_INFER_MAX_UNPACKED_EXPORTS stay unpacked: unpacking another removes the least recently asked
    # for, which is unpacked again from the store when it is asked for again.
    resolver = ModelResolver(_settings(root, infer_max_unpacked_exports=2), store)
    for attempt in (3, 4, 5):
        archive = store.export_archive(JOB, EXPORT, attempt)
        archive.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store.export_archive(JOB, EXPORT, 2), archive)

    def unpacked_attempts() -> list[int]:
        return sorted(int(path.name.split("-")[1]) for path in unpacked.parent.glob("attempt-*"))

    for attempt, kept in ((3, [2, 3]), (2, [2, 3]), (4, [2, 4]), (5, [4, 5]), (2, [2, 5])):
        time.sleep(0.02)  # a distinct modification time per use
        assert resolver.resolve(f"{EXPORT}@{JOB}/attempt-{attempt}").base.path.endswith(f"attempt-{attempt}")
        assert unpacked_attempts() == kept, (attempt, unpacked_attempts())


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            "invalid_image_url",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(b"GIF89a?")}}]}
                ]
            },
            "invalid_image",
        ),
        ({"logprobs": True}, "unsupported_parameter"),
        ({"max_tokens": 65}, "invalid_value"),
    ],
)
def test_bad_requests_are_refused(client: TestClient, root: Path, change: dict[str, Any], code: str) -> None:
    _error(client.post("/v1/chat/completions", json={**_body(), **change}, headers=AUTH), 400, code, root)


def test_a_body_that_is_not_json_is_refused(client: TestClient, root: Path) -> None:
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    _error(response, 400, "invalid_json", root)


# ---- a real server: overload and clients that go away ----------------------------------------------------------------
class _Server:
    """A uvicorn server on a free local port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        _wait(lambda: self.server.started, "the server to start")
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def open(self, body: dict[str, Any]) -> socket.socket:
        """Send a chat request on a raw connection (closed by the test, as a client that goes away)."""
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SECRET}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        connection = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        connection.sendall(head.encode() + payload)
        return connection


def _wait(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_overload_and_clients_that_go_away(settings: Settings, root: Path) -> None:
    app = create_app(_settings(root, chat_max_tokens=2000, infer_max_concurrent=2))
    backend = app.state.backend
    long = {**_body(max_tokens=2000), "stream": True}
    with _Server(app) as server:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        assert httpx.post(url, json=_body(max_tokens=1), headers=AUTH, timeout=60).status_code == 200  # loads it
        lease = backend.acquire(MODEL)
        model = lease.loaded.model
        backend.cache.release(lease)
        generated: list[int] = []
        original = model.generate

        def recording(*args: Any, **kwargs: Any) -> Any:
            sequences = original(*args, **kwargs)
            generated.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
            return sequences

        model.generate = recording
        streaming = server.open(long)
        received = b""
        while b'"delta":{"content":' not in received:  # its first text: the long answer is generating
            received += streaming.recv(65536)
        waiting = server.open(_body(max_tokens=5))  # queued behind the long answer's batch
        _wait(lambda: backend.scheduler.held == 2 and backend.scheduler.queued == 1, "the second request to queue")
        refused = httpx.post(url, json=_body(max_tokens=1), headers=AUTH, timeout=30)
        assert _error(refused, 503, "server_overloaded", root)["type"] == "server_error"
        assert refused.headers["Retry-After"] == "1"

        waiting.close()  # a queued request whose client left: out of the queue, its place freed
        _wait(lambda: backend.scheduler.held == 1 and backend.scheduler.queued == 0, "the queued request to go")
        streaming.close()  # a streaming client that left: its row stops, its place is freed
        _wait(lambda: backend.scheduler.held == 0, "the streaming request to go")
        started = time.monotonic()
        again = httpx.post(url, json=_body(max_tokens=3), headers=AUTH, timeout=30)
        assert again.status_code == 200 and time.monotonic() - started < 5
        assert generated[0] < 2000  # the long answer stopped when its client left
        _wait(lambda: len(generated) == 2, "the last batch to end")  # its answer is sent before generate returns
        time.sleep(0.1)
        assert len(generated) == 2  # the request that left the queue never generated
        del model.generate


def test_main_refuses_to_start_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    monkeypatch.setenv("DAMA_HOME", str(root))
    monkeypatch.setenv("DAMA_INFERENCE_SECRET", "")
    assert main(["--port", "1"]) == 2
    assert "DAMA_INFERENCE_SECRET" in capsys.readouterr().err
    with pytest.raises(ValueError, match="DAMA_INFERENCE_SECRET"):
        create_app(_settings(root, inference_secret=""))
