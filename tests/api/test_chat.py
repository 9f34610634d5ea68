"""``/v1``: chat with base and tuned models through the real stack, with the official ``openai`` package as client.

A real API server (uvicorn, Postgres) forwards to a real ``dama infer`` process (``python -m worker.infer``) on the
same artifact store; the tuned model is a LoRA adapter on the built-in tiny LLaVA, stored where a training job's
adapter lives, its job made succeeded in the job store as a worker would. A second API server has small chat limits
counted in a Redis of its own, which the test stops to show that the chat limits fail closed.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository
from jobstore.artifacts import ArtifactStore
from jobstore.db import session_scope
from tests.api.conftest import (
    SECRET,
    ApiServer,
    Infer,
    _free_port,
    _server_env,
    _start,
    assert_error,
    create_key,
    start_infer,
)

pytestmark = pytest.mark.slow

CHAT_MAX_IMAGES = 2
CHAT_MAX_IMAGE_PIXELS = 200 * 200


def png(size: tuple[int, int] = (48, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user_turn(text: str, *urls: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def _write_adapter(base_folder: Path, target: Path, *, seed: int) -> None:
    """A LoRA adapter on the tiny LLaVA with random (non-zero) B matrices, as a training job's export names it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from dama_engine.models.families import family_for

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(base_folder)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=family_for(model).lora_target_regex, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(target)
    adapter_config = json.loads((target / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "dama/tiny-llava"
    (target / "adapter_config.json").write_text(json.dumps(adapter_config))


@dataclass
class ChatStack:
    api: ApiServer
    infer: Infer
    key1: str
    key2: str
    job_id: str
    running_job_id: str

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.api.url}/v1", api_key=key or self.key1, max_retries=0, timeout=60)


def _succeeded_job(client: httpx.Client, db: sessionmaker[Session], dataset: dict[str, Any], *, finish: bool) -> str:
    response = client.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset["id"], "method": "dpo"})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    with session_scope(db) as session:
        running = repository.claim_job(session, job_id=job_id, worker="test-worker")
        assert running is not None
        if finish:
            repository.set_status(session, job=running, status="succeeded", result={})
    return job_id


@pytest.fixture(scope="module")
def chat_stack(
    pg_url: str,
    redis_url: str,
    db: sessionmaker[Session],
    tmp_path_factory: pytest.TempPathFactory,
    demo_archive: bytes,
) -> Iterator[ChatStack]:
    from jobstore.settings import Settings
    from tests.api.conftest import upload
    from worker.engine_config import ensure_tiny_model, model_cache_root

    tmp = tmp_path_factory.mktemp("chat")
    artifacts = tmp / "artifacts"
    models = tmp / "models"
    base_folder = ensure_tiny_model("llava", model_cache_root(Settings(model_cache_dir=models)))
    env = _server_env(
        pg_url,
        redis_url,
        artifacts,
        "test-chat-unconsumed",
        DAMA_CHAT_MAX_IMAGES=str(CHAT_MAX_IMAGES),
        DAMA_CHAT_MAX_IMAGE_PIXELS=str(CHAT_MAX_IMAGE_PIXELS),
        DAMA_CHAT_MAX_TOKENS="2000",
        DAMA_CHAT_MAX_BODY_BYTES=str(256 * 1024),
        DAMA_CHAT_IMAGE_HOSTS="localhost,127.0.0.1,images.invalid",
        DAMA_WEBHOOK_ALLOWED_HOSTS="localhost",
        DAMA_CHAT_IMAGE_FETCH_BYTES=str(64 * 1024),
    )
    backend = {"DAMA_INFER_MAX_CONCURRENT": "1", "DAMA_CHAT_MAX_TOKENS": "2000"}
    for infer in start_infer(tmp, artifacts=artifacts, models=models, **backend):
        env["DAMA_INFERENCE_URL"] = f"{infer.url}/v1"
        env["DAMA_INFERENCE_SECRET"] = SECRET
        for api in _start(tmp, env, "test-chat-unconsumed"):
            key1 = create_key(db, "chat-tenant-1")
            key2 = create_key(db, "chat-tenant-2")
            with api.client(key1) as client:
                dataset = upload(client, demo_archive, "demo.zip").json()
                job_id = _succeeded_job(client, db, dataset, finish=True)
                running_job_id = _succeeded_job(client, db, dataset, finish=False)
            store = ArtifactStore(artifacts)
            _write_adapter(base_folder, store.run_dir(job_id) / "adapter", seed=1)
            # A kept checkpoint of the running job (checkpoints/step-N/adapter, as the engine writes them).
            checkpoint = store.run_dir(running_job_id) / "checkpoints" / "step-000002"
            _write_adapter(base_folder, checkpoint / "adapter", seed=2)
            with session_scope(db) as session:
                repository.add_checkpoint(session, job_id=running_job_id, step=2, path=str(checkpoint))
            yield ChatStack(api, infer, key1, key2, job_id, running_job_id)


def test_openai_client_base_and_tuned_model_with_an_image(chat_stack: ChatStack) -> None:
    client = chat_stack.openai()
    image = data_uri(png())
    messages: Any = user_turn("Describe the image.", image)
    answers = {}
    for model in ("dama/tiny-llava", chat_stack.job_id):
        completion = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        assert completion.object == "chat.completion" and completion.model == model
        choice = completion.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert completion.usage is not None
        assert completion.usage.prompt_tokens > 0 and 0 < completion.usage.completion_tokens <= 12
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
        answers[model] = choice.message.content or ""

        # Streamed: the same greedy answer, OpenAI's chunks, a usage chunk on request, then [DONE].
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert all(chunk.object == "chat.completion.chunk" and chunk.model == model for chunk in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text == answers[model]
        finish = [
            chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
        ]
        assert finish == [choice.finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == completion.usage
    assert answers["dama/tiny-llava"] != answers[chat_stack.job_id], "the adapter changes the model's answers"

    # Without include_usage no chunk carries usage; a seeded sampled answer repeats.
    quiet = list(
        client.chat.completions.create(
            model=chat_stack.job_id, messages=messages, max_tokens=6, temperature=0, stream=True
        )
    )
    assert all(chunk.usage is None for chunk in quiet) and all(chunk.choices for chunk in quiet)
    sampled = [
        client.chat.completions.create(
            model="dama/tiny-llava", messages=messages, max_tokens=8, temperature=1.0, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]

    # The tokens are the tenant's usage.
    with chat_stack.api.client(chat_stack.key1) as http:
        usage = http.get("/usage").json()
    by_model = {line["model"]: line for line in usage["data"]}
    assert by_model["dama/tiny-llava"]["requests"] >= 4 and by_model[chat_stack.job_id]["requests"] >= 3
    assert usage["total_completion_tokens"] >= 12 and usage["total_prompt_tokens"] > 0
    assert usage["total_requests"] == sum(line["requests"] for line in usage["data"])


def test_a_kept_checkpoint_and_a_job_not_ready(chat_stack: ChatStack) -> None:
    client = chat_stack.openai()
    messages: Any = user_turn("What is here?", data_uri(png(color=(20, 90, 200))))
    model = f"{chat_stack.running_job_id}:2"
    completion = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)
    assert completion.model == model and completion.usage is not None
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model=f"{chat_stack.running_job_id}:3", messages=messages, max_tokens=5, temperature=0
        )
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.ConflictError) as not_ready:
        client.chat.completions.create(model=chat_stack.running_job_id, messages=messages, max_tokens=5)
    assert not_ready.value.code == "model_not_ready"


def test_models_are_the_tenants_own(chat_stack: ChatStack) -> None:
    mine = {model.id: model for model in chat_stack.openai().models.list()}
    assert {"dama/tiny-llava", "dama/tiny-seeing-llava", chat_stack.job_id} <= set(mine)
    assert chat_stack.running_job_id not in mine  # not succeeded: its checkpoints are callable, it is not listed
    assert mine[chat_stack.job_id].owned_by == "chat-tenant-1"
    other = chat_stack.openai(chat_stack.key2)
    assert chat_stack.job_id not in {model.id for model in other.models.list()}
    for model in (chat_stack.job_id, f"{chat_stack.running_job_id}:2"):
        with pytest.raises(openai.NotFoundError) as refused:
            other.chat.completions.create(model=model, messages=user_turn("hi"), max_tokens=3)
        assert refused.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        chat_stack.openai("dama_not-a-key").models.list()


class _ImageServer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
            return
        body = png() if self.path == "/cat.png" else png((400, 400)) if self.path == "/huge.png" else b"x" * 100_000
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()


def test_remote_image_urls(chat_stack: ChatStack, image_server: int) -> None:
    port = image_server
    with chat_stack.api.client(chat_stack.key1) as http_client:

        def ask(url: str) -> httpx.Response:
            return http_client.post(
                "/v1/chat/completions",
                json={"model": "dama/tiny-llava", "messages": user_turn("Describe.", url), "max_tokens": 4},
            )

        # localhost is on DAMA_CHAT_IMAGE_HOSTS and trusted (DAMA_WEBHOOK_ALLOWED_HOSTS): the API fetches it.
        fetched = ask(f"http://localhost:{port}/cat.png")
        assert fetched.status_code == 200, fetched.text
        param = "messages[0].content[0].image_url.url"
        # 127.0.0.1 is allowed as a host but is loopback and not trusted; 10.x is not on the list at all.
        for url, code in (
            (f"http://127.0.0.1:{port}/cat.png", "remote_image_not_allowed"),
            ("http://10.0.0.7/cat.png", "remote_image_not_allowed"),
            ("http://user:pw@localhost/cat.png", "remote_image_not_allowed"),
            (f"http://localhost:{port}/redirect", "image_fetch_failed"),
            (f"http://localhost:{port}/big", "image_too_large"),
            (f"http://localhost:{port}/huge.png", "image_too_large"),
            (f"http://localhost:{_free_port()}/cat.png", "image_fetch_failed"),
            ("ftp://localhost/cat.png", "invalid_image_url"),
        ):
            error = assert_error(ask(url), 400, code)
            assert error["param"] == param and error["type"] == "invalid_request_error", url


def test_refusals_in_openais_shape(chat_stack: ChatStack) -> None:
    good = data_uri(png())
    base: dict[str, Any] = {"model": "dama/tiny-llava", "messages": user_turn("Describe.", good), "max_tokens": 4}
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [
        ({**base, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter", "tools"),
        ({**base, "response_format": {"type": "json_object"}}, 400, "unsupported_parameter", "response_format"),
        ({**base, "logprobs": True}, 400, "unsupported_parameter", "logprobs"),
        ({**base, "response_format": {"type": "json_object"}}, 400, "unsupported_parameter", "response_format"),
        ({**base, "tool_choice": "auto"}, 400, "unsupported_parameter", "tool_choice"),
        ({**base, "store": True}, 400, "unsupported_parameter", "store"),
        ({**base, "presence_penalty": False}, 400, "invalid_value", "presence_penalty"),  # strict: no bool for 0
        ({**base, "messages": [{"role": "user", "content": None}]}, 400, "invalid_value", "messages[0]"),
        ({**base, "n": 2}, 400, "unsupported_parameter", "n"),
        ({**base, "presence_penalty": 0.5}, 400, "unsupported_parameter", "presence_penalty"),
        ({**base, "max_tokens": 5000}, 400, "invalid_value", "max_tokens"),
        ({**base, "temperature": 3}, 400, "invalid_value", "temperature"),
        ({**base, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
        ({**base, "model": "no-such/model"}, 404, "model_not_found", "model"),
        ({**base, "model": "dama/tiny-lava"}, 404, "model_not_found", "model"),
        ({**base, "model": "job_doesnotexist00"}, 404, "model_not_found", "model"),
        ({**base, "messages": []}, 400, "invalid_value", "messages"),
        ({**base, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "invalid_value", None),
        (
            {**base, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            400,
            "invalid_value",
            None,
        ),
        ({**base, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "messages[0].role"),
        (
            {**base, "messages": user_turn("x", "data:image/png;base64,bm90IGFuIGltYWdl")},
            400,
            "invalid_image",
            "messages[0].content[0].image_url.url",
        ),
        (  # a header that a backtracking pattern would take minutes to refuse
            {**base, "messages": user_turn("x", "data:image/png" + (";" + "a=" * 10) * 12 + ",")},
            400,
            "invalid_image_url",
            "messages[0].content[0].image_url.url",
        ),
        (
            {**base, "messages": user_turn("x", "data:image/png;base64,***")},
            400,
            "invalid_image_url",
            "messages[0].content[0].image_url.url",
        ),
        (
            {**base, "messages": user_turn("x", data_uri(png((300, 300))))},
            400,
            "image_too_large",
            "messages[0].content[0].image_url.url",
        ),
        (
            {**base, "messages": user_turn("x", good, good, good)},
            400,
            "too_many_images",
            f"messages[0].content[{CHAT_MAX_IMAGES}].image_url.url",
        ),
    ]
    artifacts = str(chat_stack.api.artifacts)
    with chat_stack.api.client(chat_stack.key1) as client:
        for body, status, code, param in cases:
            response = client.post("/v1/chat/completions", json=body)
            error = assert_error(response, status, code)
            if param is not None:
                assert error["param"] == param, (body, error)
            assert artifacts not in response.text and "/tmp" not in response.text, response.text
        assert "did you mean" not in client.post("/v1/chat/completions", json={**base, "model": "x"}).text
        assert "dama/tiny-llava" in client.post("/v1/chat/completions", json={**base, "model": "dama/tiny-lava"}).text
        # Not JSON; over the /v1 routes' own body limit (other routes keep theirs).
        invalid = client.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"})
        assert_error(invalid, 400, "invalid_json")
        big = data_uri(os.urandom(300 * 1024))
        too_large = client.post("/v1/chat/completions", json={**base, "messages": user_turn("x", big)})
        assert_error(too_large, 413, "request_too_large")
        assert "DAMA_CHAT_MAX_BODY_BYTES" in too_large.text
    # What common clients send with default values is accepted (and an assistant turn replayed with no content).
    with chat_stack.api.client(chat_stack.key1) as client:
        defaults = {"user": "u-1", "logprobs": False, "store": False, "metadata": {"a": "b"}, "tool_choice": "none"}
        defaults |= {"parallel_tool_calls": True, "response_format": {"type": "text"}, "n": 1}
        turns = [*user_turn("Describe.", good), {"role": "assistant", "content": None}, *user_turn("And?")]
        accepted = client.post("/v1/chat/completions", json={**base, **defaults, "messages": turns})
        assert accepted.status_code == 200, accepted.text
    # The openai package raises its own errors with code and param.
    with pytest.raises(openai.BadRequestError) as refused:
        chat_stack.openai().chat.completions.create(
            model="dama/tiny-llava", messages=user_turn("hi"), max_tokens=3, n=3
        )
    assert refused.value.code == "unsupported_parameter" and refused.value.param == "n"


def test_a_client_that_leaves_frees_its_slot(chat_stack: ChatStack) -> None:
    """The backend holds one request at a time here (DAMA_INFER_MAX_CONCURRENT=1): while a long stream runs, another
    request is refused 503; once its client hangs up, the API closes its stream to the backend, which stops the
    generation and frees the place: the next request is served in far less time than the whole answer takes."""
    body = {
        "model": "dama/tiny-llava",
        "messages": user_turn("Tell a long story."),
        "max_tokens": 2000,
        "temperature": 0,
        "stop": ["never-appears-in-an-answer"],
    }
    with httpx.Client(base_url=chat_stack.api.url, headers={"Authorization": f"Bearer {chat_stack.key1}"}) as client:
        started = time.monotonic()
        whole = client.post("/v1/chat/completions", json=body, timeout=120)
        whole_s = time.monotonic() - started
        assert whole.status_code == 200 and whole.json()["choices"][0]["finish_reason"] == "length", whole.text
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as stream:
            assert stream.status_code == 200, stream.read().decode()
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            busy = client.post("/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=30)
            assert_error(busy, 503, "server_overloaded")
            assert busy.headers.get("retry-after")
        assert seconds_until_served(client, body, give_up_s=whole_s) < whole_s / 2, whole_s

        # Not streamed: the client gives up waiting (its read timeout); the API notices and closes its request to
        # the backend, so the whole answer is not generated for nobody.
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
        assert seconds_until_served(client, body, give_up_s=whole_s) < whole_s / 2, whole_s


def seconds_until_served(client: httpx.Client, body: dict[str, Any], *, give_up_s: float) -> float:
    """How long until a short request is answered 200 (while the backend's one place is taken: 503), asking
    every 20 ms; fails after ``give_up_s``."""
    started = time.monotonic()
    while True:
        after = client.post("/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=30)
        if after.status_code == 200:
            return time.monotonic() - started
        assert_error(after, 503, "server_overloaded")
        assert time.monotonic() - started < give_up_s, "the place was not freed"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def limited_chat(
    pg_url: str, redis_url: str, chat_stack: ChatStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ApiServer, subprocess.Popen[bytes]]]:
    """An API with small chat limits whose counters live in a Redis of its own (stopped by the test)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    tmp = tmp_path_factory.mktemp("chat-limited")
    port = _free_port()
    store = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    env = _server_env(
        pg_url,
        redis_url,
        tmp / "artifacts",
        "test-chat-unconsumed",
        DAMA_INFERENCE_URL=f"{chat_stack.infer.url}/v1",
        DAMA_INFERENCE_SECRET=SECRET,
        DAMA_RATE_LIMIT_STORAGE=f"redis://127.0.0.1:{port}/0",
        DAMA_CHAT_RATE_LIMIT="3/minute",
        DAMA_CHAT_TOKEN_LIMIT="60/minute",
    )
    try:
        for api in _start(tmp, env, "test-chat-unconsumed"):
            yield api, store
    finally:
        store.kill()
        store.wait()


def test_chat_limits_hold_and_fail_closed(
    limited_chat: tuple[ApiServer, subprocess.Popen[bytes]], db: sessionmaker[Session]
) -> None:
    api, store = limited_chat
    text_only: dict[str, Any] = {"model": "dama/tiny-llava", "messages": [{"role": "user", "content": "hi"}]}
    with api.client(create_key(db, "chat-limited-1")) as client:
        assert client.post("/v1/chat/completions", json={**text_only, "max_tokens": 2}).status_code == 200
        # More than the token limit in one request: refused outright (counted as a request, reserving nothing).
        assert_error(
            client.post("/v1/chat/completions", json={**text_only, "max_tokens": 100}), 400, "request_over_limit"
        )
        assert client.post("/v1/chat/completions", json={**text_only, "max_tokens": 2}).status_code == 200
        limited = client.post("/v1/chat/completions", json={**text_only, "max_tokens": 2})
        assert_error(limited, 429, "rate_limit_exceeded")
        assert int(limited.headers["retry-after"]) >= 1 and "requests" in limited.json()["error"]["message"]
    with api.client(create_key(db, "chat-limited-2")) as client:
        # max_tokens is reserved up front: 40 + the prompt's estimate, then 30 more would pass 60 tokens a minute.
        assert client.post("/v1/chat/completions", json={**text_only, "max_tokens": 40}).status_code == 200
        tokens = client.post("/v1/chat/completions", json={**text_only, "max_tokens": 30})
        assert_error(tokens, 429, "rate_limit_exceeded")
        assert "tokens" in tokens.json()["error"]["message"]
    store.kill()
    store.wait()
    with api.client(create_key(db, "chat-limited-3")) as client:
        down = client.post("/v1/chat/completions", json={**text_only, "max_tokens": 2})
        assert_error(down, 503, "rate_limiter_unavailable")
        assert down.headers.get("retry-after")
        # The general request limit fails open: the rest of the API keeps working without its counters.
        assert client.get("/v1/models").status_code == 200
        again = client.post("/v1/chat/completions", json={**text_only, "max_tokens": 2})
        assert_error(again, 503, "rate_limiter_unavailable")


def test_playground_marks_answers_with_the_matcher_in_the_backend(
    chat_stack: ChatStack, tmp_path: Path, demo_archive: bytes
) -> None:
    from dama_engine.proving.shapes import make_demo_dataset
    from tests.api.conftest import upload, zip_bytes

    scenes = make_demo_dataset(tmp_path, n_train=0, n_eval=0, n_generative=3, image_size=32, seed=5)
    members = {
        "generative_eval.jsonl": scenes.generative_eval.read_bytes(),
        "vocabulary.json": scenes.vocabulary.read_bytes(),
    }
    for image in sorted((tmp_path / "images").glob("gen_*")):
        members[f"images/{image.name}"] = image.read_bytes()
    with chat_stack.api.client(chat_stack.key1) as client:
        created = upload(client, zip_bytes(members), "scenes.zip", format="generative")
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        row = client.get(f"/datasets/{dataset_id}/rows", params={"limit": 1}).json()["data"][0]
        truth = row["objects"]
        colour, shape = truth[0].split()
        wrong = "purple" if colour != "purple" else "red"
        answer = f"A {colour} {shape} and a {wrong} {shape}."
        marked = client.post(
            "/playground/judge", json={"dataset_id": dataset_id, "row": row["row"], "answers": [answer, "Nothing."]}
        )
        assert marked.status_code == 200, marked.text
        body = marked.json()
        assert body["objects"] == truth and len(body["judgements"]) == 2
        first, second = body["judgements"]
        assert [(m["text"], m["hallucinated"]) for m in first["mentions"]] == [
            (f"{colour} {shape}", False),
            (f"{wrong} {shape}", True),
        ]
        assert all(answer[m["start"] : m["end"]] == m["text"] for m in first["mentions"])
        assert first["hallucinated"] == [f"{wrong} {shape}"] and truth[0] in first["covered"]
        assert second["mentions"] == [] and sorted(second["missed"]) == sorted(truth)
        # A preference dataset is no generative set; a row outside the preview; another tenant's set.
        preference = upload(client, demo_archive, "demo.zip").json()["id"]
        body_for = {"row": 1, "answers": ["x"]}
        assert_error(
            client.post("/playground/judge", json={**body_for, "dataset_id": preference}), 400, "not_generative"
        )
        missing_row = {"dataset_id": dataset_id, "row": 99, "answers": ["x"]}
        assert_error(client.post("/playground/judge", json=missing_row), 404, "row_not_found")
    with chat_stack.api.client(chat_stack.key2) as other:
        assert_error(other.post("/playground/judge", json={**body_for, "dataset_id": dataset_id}), 404)


def test_the_sdk_and_dama_chat(chat_stack: ChatStack, tmp_path: Path) -> None:
    from dama_client import Client
    from dama_client.client import user_message

    image = tmp_path / "scene.png"
    image.write_bytes(png(color=(30, 160, 60)))
    messages: Any = [user_message("Describe the image.", image)]
    expected = chat_stack.openai().chat.completions.create(
        model=chat_stack.job_id, messages=messages, max_tokens=10, temperature=0
    )
    with Client(chat_stack.api.url, chat_stack.key1) as client:
        done = client.chat.complete(model=chat_stack.job_id, messages=messages, max_tokens=10, temperature=0)
        chunks = list(client.chat.stream(model=chat_stack.job_id, messages=messages, max_tokens=10, temperature=0))
        assert done.text == expected.choices[0].message.content == "".join(chunk.text for chunk in chunks)
        assert chat_stack.job_id in {model.id for model in client.chat.models().data}
        assert client.usage.get().total_requests > 0
    env = {**os.environ, "DAMA_API_URL": chat_stack.api.url, "DAMA_API_KEY": chat_stack.key1}
    command = [str(Path(sys.executable).parent / "dama"), "chat", "--model", chat_stack.job_id, "--image", str(image)]
    command += ["--max-tokens", "10", "--temperature", "0", "Describe the image."]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == done.text
    assert re.search(r"\[[0-9]+ prompt \+ [0-9]+ completion tokens\]", result.stderr)
    refused = subprocess.run(
        [*command[:3], "job_nope", *command[4:]], env=env, capture_output=True, text=True, check=False
    )
    assert refused.returncode == 1 and "model_not_found" in refused.stderr


@pytest.fixture(scope="module")
def export_worker_settings(chat_stack: ChatStack, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A worker's settings on the stack's artifact store and model cache (the export task runs in this process)."""
    from jobstore.settings import Settings

    artifacts = chat_stack.api.artifacts
    home = tmp_path_factory.mktemp("export-worker")
    return Settings(home=home, artifacts_dir=artifacts, artifacts_url=None, model_cache_dir=artifacts.parent / "models")


def test_a_merged_export_is_a_chat_model(
    chat_stack: ChatStack, db: sessionmaker[Session], export_worker_settings: Any
) -> None:
    """``POST /jobs/{id}/exports`` then the export task, as a worker runs it (merge, pack, publish, record): the
    tenant calls ``exp_...`` once it has succeeded, and it answers (greedy) what the job's adapter answers."""
    from worker.exports import run_export

    with chat_stack.api.client(chat_stack.key1) as http_client:
        created = http_client.post(f"/jobs/{chat_stack.job_id}/exports", json={"format": "merged"})
        assert created.status_code in (200, 202), created.text
    export_id: str = created.json()["id"]
    client = chat_stack.openai()
    messages: Any = user_turn("Describe the image.", data_uri(png(color=(60, 60, 220))))
    with pytest.raises(openai.ConflictError) as not_ready:
        client.chat.completions.create(model=export_id, messages=messages, max_tokens=5, temperature=0)
    assert not_ready.value.code == "model_not_ready" and not_ready.value.param == "model"

    status = run_export(export_id, session_factory=db, settings=export_worker_settings, worker="test-export-worker")
    assert status == "succeeded"
    answers = {}
    for model in (chat_stack.job_id, export_id):
        completion = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        assert completion.model == model and completion.usage is not None and completion.usage.completion_tokens > 0
        answers[model] = completion.choices[0].message.content
    assert answers[export_id] == answers[chat_stack.job_id]  # merging does not change the model
    streamed = client.chat.completions.create(
        model=export_id, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == answers[export_id]

    mine = {model.id: model for model in client.models.list()}
    assert mine[export_id].owned_by == "chat-tenant-1"
    assert (mine[export_id].model_extra or {}).get("base_model") == "dama/tiny-llava"
    other = chat_stack.openai(chat_stack.key2)
    assert export_id not in {model.id for model in other.models.list()}
    for key, model in ((chat_stack.key2, export_id), (chat_stack.key1, "exp_doesnotexist00")):
        with pytest.raises(openai.NotFoundError) as refused:
            chat_stack.openai(key).chat.completions.create(model=model, messages=messages, max_tokens=3)
        assert refused.value.code == "model_not_found" and refused.value.param == "model"
        assert str(chat_stack.api.artifacts) not in str(refused.value.body)
