"""``dama infer``: the service's own OpenAI-compatible inference backend (``python -m worker.infer``).

The API checks a tenant's ``POST /v1/chat/completions`` and forwards it here (``DAMA_INFERENCE_URL``) with
``Authorization: Bearer <DAMA_INFERENCE_SECRET>``; any OpenAI client can talk to it the same way. Routes:

* ``GET /health`` (no auth): ``{"status": "ok"}``;
* ``GET /v1/models``: the models and adapters loaded now, in OpenAI's list shape;
* ``POST /v1/dama/judge``: answers marked against an image's objects with the CHAIR matcher (each mention's span,
  hallucinated or grounded; covered and missed objects), for the console's playground (``POST /playground/judge`` on
  the API forwards here);
* ``POST /v1/chat/completions``: a ``chat.completion``, or with ``stream: true`` server-sent
  ``chat.completion.chunk`` events (the role first, then the text as it is generated, a last chunk with the
  finish reason, the usage with ``stream_options.include_usage``, then ``data: [DONE]``; an error after the
  stream started is one ``data: {"error": ...}`` event, and the stream ends).

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` and never names a server path. The
request rules are :mod:`dama_engine.serving.protocol`'s.

**What ``model`` names** (:class:`ModelResolver`):

* a built-in model (``dama/tiny-llava``, ...): built into the model cache on first use, exactly as the worker
  builds it (:func:`worker.engine_config.ensure_tiny_model` / ``ensure_seeing_base``), loaded in float32;
* ``job_<id>``: that training job's exported adapter (``run_dir(job)/adapter``, fetched from the artifact store);
  ``job_<id>:<step>``: the adapter of its kept checkpoint at that step. A PEFT adapter is loaded onto the base its
  ``adapter_config.json`` names (the job's model, resolved as above); a folder with ``config.json`` instead is a
  full fine-tune, loaded as a model of its own (float32 when saved so, else as a hub model);
* ``exp_<id>@<job_id>/attempt-<n>``: a merged export, as the API names it for a tenant's ``exp_<id>`` once it has
  succeeded (``n``: the run that recorded its archive). Nothing else is accepted, so no request names a path: the
  archive is ``ArtifactStore.export_archive(job_id, exp_id, n)`` (``jobs/<job>/exports/<exp>/attempt-<n>/model.tar``,
  fetched from the store), unpacked once (tarfile's ``data`` filter; into a temporary sibling, then renamed) under
  ``<scratch>/infer-exports/`` and loaded as a model of its own, like a full fine-tune; at most
  ``DAMA_INFER_MAX_UNPACKED_EXPORTS`` stay unpacked (the least recently asked for is removed when another is
  unpacked, and unpacked again from the store when asked for again);
* anything else: a hub name or local folder, loaded with ``from_pretrained`` (bf16 on a GPU that has it, else
  float32; remote code only when ``DAMA_ALLOW_REMOTE_CODE`` is on).

Unknown or missing: 404 ``model_not_found``.

**Serving** (:mod:`dama_engine.serving`): models stay loaded within ``DAMA_INFER_CACHE_BYTES`` (least recently used
evicted), at most ``DAMA_INFER_MAX_ADAPTERS`` adapters per base; one batching thread answers up to
``DAMA_INFER_MAX_BATCH`` requests per ``generate`` call, gathered for ``DAMA_INFER_BATCH_WINDOW_MS``; at most
``DAMA_INFER_MAX_CONCURRENT`` requests are held at once (503 ``server_overloaded`` with ``Retry-After`` above).
A client that goes away is dropped from the queue, or its row stops at the next step, and its place is freed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from jobstore.artifacts import ArtifactStore, open_store
from jobstore.settings import Settings
from jobstore.spec import BUILTIN_PREFIX, SEEING_MODEL, TINY_MODELS

if TYPE_CHECKING:
    from dama_engine.serving import (
        Admission,
        ChatAnswer,
        ChatError,
        ChatResponder,
        Event,
        Lease,
        ModelCache,
        ModelRef,
        ModelSource,
        Scheduler,
        Ticket,
    )

log = logging.getLogger(__name__)

JOB_MODEL = re.compile(r"^(?P<job>job_[A-Za-z0-9]+)(?::(?P<step>[0-9]{1,9}))?$")
# A merged export, as the API asks for it (api.services.chat.resolve): the ids and the attempt, never a path.
EXPORT_MODEL = re.compile(
    r"^(?P<export>exp_[A-Za-z0-9]{1,60})@(?P<job>job_[A-Za-z0-9]{1,60})/attempt-(?P<attempt>[1-9][0-9]{0,8})$"
)
EXPORT_LIKE = re.compile(r"^exp_[A-Za-z0-9]+(?:@|$)")  # an export id in any other form: not a hub name either
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
CLIENT_GONE = 499  # the status logged for a request whose client left before its answer (nginx's)
THREAD_SPARE = 16  # worker threads beyond one per admitted request (the judge, shutdown)


class ModelResolver:
    """What a request's ``model`` names -> what the model cache loads (module docstring). Blocking: it may build a
    built-in model or fetch an adapter from the artifact store."""

    def __init__(self, settings: Settings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store
        # Merged exports are unpacked here (this server's own scratch area, never the shared artifact store).
        self.exports_root = settings.resolved_scratch_dir / "infer-exports"
        self._unpacking = threading.Lock()

    def resolve(self, model: str) -> ModelRef:
        from dama_engine.serving import ModelRef

        job = JOB_MODEL.match(model)
        if job is not None:
            return self._job(model, job["job"], None if job["step"] is None else int(job["step"]))
        export = EXPORT_MODEL.match(model)
        if export is not None:
            return self._export(model, export["job"], export["export"], int(export["attempt"]))
        return ModelRef(self._base(model, requested=model))

    def _base(self, name: str, *, requested: str) -> ModelSource:
        from dama_engine.serving import ModelSource, model_not_found
        from worker.engine_config import ensure_seeing_base, ensure_tiny_model, model_cache_root

        if name in TINY_MODELS or name == SEEING_MODEL:
            root = model_cache_root(self.settings)
            folder = ensure_tiny_model(TINY_MODELS[name], root) if name in TINY_MODELS else ensure_seeing_base(root)
            # As the worker trains and evaluates them: float32 everywhere, so answers match its evaluations.
            return ModelSource(name, str(folder), precision="fp32")
        if name.startswith(BUILTIN_PREFIX) or JOB_MODEL.match(name) or EXPORT_LIKE.match(name):
            raise model_not_found(requested)
        return ModelSource(name, name, precision="auto", trust_remote_code=self.settings.allow_remote_code)

    def _job(self, model: str, job_id: str, step: int | None) -> ModelRef:
        from dama_engine.serving import AdapterSource, ModelRef, ModelSource, model_not_found
        from dama_engine.training import ADAPTER_DIR, checkpoint_dir
        from worker.engine_config import adapter_folder

        if step is None:
            folder = adapter_folder(self.store, job_id)
        else:
            folder = checkpoint_dir(self.store.run_dir(job_id), step) / ADAPTER_DIR
        self.store.fetch(folder)  # S3: into this server's local copy
        if (folder / "adapter_config.json").is_file():
            base = _adapter_base(folder)
            weights = any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin"))
            if base is None or not weights:
                raise model_not_found(model)
            return ModelRef(self._base(base, requested=model), AdapterSource(model, str(folder)))
        if (folder / "config.json").is_file():  # a full fine-tune: a model of its own
            return ModelRef(ModelSource(model, str(folder), precision=_saved_precision(folder)))
        raise model_not_found(model)

    def _export(self, model: str, job_id: str, export_id: str, attempt: int) -> ModelRef:
        """A merged export's model folder: its archive from the store, unpacked once (a model of its own)."""
        from dama_engine.serving import ModelRef, ModelSource, model_not_found

        folder = self.exports_root / job_id / export_id / f"attempt-{attempt}"
        if not (folder / "config.json").is_file():
            with self._unpacking:  # one unpacking at a time in this server; other servers rename atomically
                if not (folder / "config.json").is_file():
                    self._unpack_export(model, job_id, export_id, attempt, folder)
                    self._prune_exports(keep=folder)
        if not (folder / "config.json").is_file():
            raise model_not_found(model)
        with contextlib.suppress(OSError):
            os.utime(folder)  # its last use, for :meth:`_prune_exports`
        return ModelRef(ModelSource(model, str(folder), precision=_saved_precision(folder)))

    def _prune_exports(self, *, keep: Path) -> None:
        """Remove the least recently used unpacked exports beyond ``infer_max_unpacked_exports`` (never ``keep``,
        the one just unpacked). A loaded model keeps answering (its weights are in memory); asked for again after
        its cache entry went too, it is unpacked again from the store."""
        folders = [path for path in self.exports_root.glob("*/*/attempt-*") if path.is_dir() and path != keep]
        folders.sort(key=_mtime, reverse=True)
        for folder in folders[self.settings.infer_max_unpacked_exports - 1 :]:
            log.info("removing the unpacked export %s (least recently used)", folder.relative_to(self.exports_root))
            shutil.rmtree(folder, ignore_errors=True)
            for parent in (folder.parent, folder.parent.parent):
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only when empty

    def _unpack_export(self, model: str, job_id: str, export_id: str, attempt: int, folder: Path) -> None:
        from dama_engine.serving import model_not_found

        archive = self.store.export_archive(job_id, export_id, attempt)
        if not archive.resolve().is_relative_to(self.store.export_dir(job_id, export_id).resolve()):
            raise model_not_found(model)
        if not self.store.fetch(archive) or not archive.is_file():  # S3: into this server's local copy
            raise model_not_found(model)
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.unpacking-"))
        try:
            try:
                with tarfile.open(archive) as bundle:
                    bundle.extractall(partial, filter="data")  # no links, devices or paths outside
            except tarfile.TarError as error:  # not a tar, truncated, or a member the filter refuses
                log.warning("export archive of %s could not be unpacked: %s", model, error)
                raise model_not_found(model) from None
            if not (partial / "config.json").is_file():
                raise model_not_found(model)
            if folder.is_dir() and not (folder / "config.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)  # a leftover that is no model
            try:
                partial.rename(folder)
            except OSError:
                if not (folder / "config.json").is_file():  # else another server unpacked it first: the same files
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            if self.store.remote:
                archive.unlink(missing_ok=True)  # only the local copy: the unpacked folder is what is served


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _adapter_base(folder: Path) -> str | None:
    """The base model an adapter names (its job's model), or None when it names none."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def _saved_precision(folder: Path) -> Literal["auto", "fp32"]:
    """fp32 for weights saved in float32 (a fine-tune of a built-in model), else auto (as a hub model)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "auto"
    dtype = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return "fp32" if dtype == "float32" else "auto"


class InferenceBackend:
    """The server's state: settings, artifact store, model resolver, model cache and batching scheduler."""

    def __init__(self, settings: Settings) -> None:
        from dama_engine.serving import ChatLimits, ModelCache, Scheduler, serving_device

        self.settings = settings
        # S3: adapters are fetched into a folder of this server's own (not a worker's evicted scratch areas).
        self.store = open_store(settings, local_root=settings.resolved_scratch_dir / "infer")
        self.resolver = ModelResolver(settings, self.store)
        self.cache: ModelCache = ModelCache(
            max_bytes=settings.infer_cache_bytes,
            max_adapters=settings.infer_max_adapters,
            device=serving_device(settings.infer_gpu_memory_fraction),
        )
        self.scheduler: Scheduler = Scheduler(
            max_batch=settings.infer_max_batch,
            window_s=settings.infer_batch_window_ms / 1000,
            max_concurrent=settings.infer_max_concurrent,
        )
        self.limits = ChatLimits(
            max_tokens=settings.chat_max_tokens,
            max_images=settings.chat_max_images,
            max_image_pixels=settings.chat_max_image_pixels,
        )

    def acquire(self, model: str) -> Lease:
        """Resolve ``model`` and hold it loaded (blocking)."""
        return self.cache.acquire(self.resolver.resolve(model))


class _Call:
    """One chat request in flight: its place among the concurrent ones, its model lease, its ticket and the queue its
    events arrive on. :meth:`close` (idempotent) gives everything back and stops its row if it still runs."""

    def __init__(self, backend: InferenceBackend, admission: Admission) -> None:
        self.backend = backend
        self.admission = admission
        self.lease: Lease | None = None
        self.ticket: Ticket | None = None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.pending: Event | None = None  # taken from the queue by text_ready, not handled yet
        self.loop = asyncio.get_running_loop()
        self.closed = False

    def sink(self, event: Event) -> None:
        """Where the batching thread sends this request's events (the event loop's queue, thread-safely)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def hold(self, model: str) -> None:
        """Hold the model (in a worker thread); kept on the call even if the awaiting request is cancelled."""
        self.lease = self.backend.acquire(model)

    async def next_event(self, request: Request) -> Event | None:
        """The next event, or None once the client has gone away."""
        if self.pending is not None:
            event, self.pending = self.pending, None
            return event
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return None

    def text_ready(self) -> str:
        """The text of the deltas already queued (a stream that fell behind sends them as one chunk)."""
        from dama_engine.serving import TextDelta

        parts = []
        while self.pending is None and not self.events.empty():
            event = self.events.get_nowait()
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                self.pending = event
        return "".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ticket is not None:
            self.backend.scheduler.cancel(self.ticket)  # no effect once its answer is out
        if self.lease is not None:
            self.backend.cache.release(self.lease)
        self.admission.release()


class _EventStream(StreamingResponse):
    """A server-sent event stream that closes its call however it ends (finished, failed, or client gone)."""

    def __init__(self, content: AsyncIterator[bytes], call: _Call) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.close()


def _sse(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


async def _stream(call: _Call, responder: ChatResponder, request: Request) -> AsyncIterator[bytes]:
    from dama_engine.serving import Finished, TextDelta

    try:
        yield _sse(responder.chunk({"role": "assistant", "content": ""}))
        while (event := await call.next_event(request)) is not None:
            if isinstance(event, TextDelta):
                yield _sse(responder.chunk({"content": event.text + call.text_ready()}))
            elif isinstance(event, Finished):
                yield _sse(responder.chunk({}, event.answer.finish_reason))
                if responder.include_usage:
                    yield _sse(responder.usage_chunk(event.answer))
                yield b"data: [DONE]\n\n"
                return
            else:
                yield _sse(event.error.body())
                return
    finally:
        call.close()


async def _answer(call: _Call, request: Request) -> ChatAnswer | None:
    """The whole answer (None: the client went away); raises the row's error."""
    from dama_engine.serving import Failed, Finished

    while (event := await call.next_event(request)) is not None:
        if isinstance(event, Finished):
            return event.answer
        if isinstance(event, Failed):
            raise event.error
    return None


def _error_response(error: ChatError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(settings: Settings) -> FastAPI:
    """The backend's FastAPI app; its lifespan starts and stops the batching thread. Refuses an empty
    ``inference_secret`` (every /v1 request needs it)."""
    if not settings.inference_secret:
        raise ValueError("DAMA_INFERENCE_SECRET is empty: `dama infer` serves only requests that carry it")
    if settings.model_cache_dir is not None:
        # Hub downloads go to the model cache, as the workers'; set before transformers is first imported (below).
        os.environ.setdefault("HF_HOME", str(settings.model_cache_dir))
    from dama_engine.serving import ChatError, ChatResponder, Ticket, parse_chat_request, server_error

    backend = InferenceBackend(settings)
    secret = settings.inference_secret.encode()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Every admitted request may hold one worker thread (decoding its images, waiting for its model to load):
        # room for all of them and the judge, so requests for a model still loading never starve the others.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.infer_max_concurrent + THREAD_SPARE
        backend.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(backend.scheduler.stop)

    app = FastAPI(title="dama infer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend

    def authorized(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), secret):
            raise ChatError(
                "Missing or wrong bearer token (Authorization: Bearer <DAMA_INFERENCE_SECRET>).",
                status=401,
                code="invalid_api_key",
                kind="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(ChatError)
    async def chat_error(_: Request, error: ChatError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "Unknown route." if error.status_code == 404 else f"HTTP {error.status_code}."
        return _error_response(ChatError(message, status=error.status_code, code=None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=error)
        return _error_response(server_error("Internal server error."))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "dama"}
            for name, created in backend.cache.loaded_models()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ChatError("The request body is not valid JSON.", code="invalid_json") from None
        parsed = await run_in_threadpool(parse_chat_request, body, backend.limits)  # decodes the images
        call = _Call(backend, backend.scheduler.admit())
        try:
            await run_in_threadpool(call.hold, parsed.model)
            assert call.lease is not None
            call.ticket = Ticket.make(call.lease, parsed.generation, parsed.settings, call.sink, stream=parsed.stream)
            backend.scheduler.submit(call.ticket)
        except BaseException:
            call.close()
            raise
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        responder = ChatResponder(completion_id, created, parsed.model, include_usage=parsed.include_usage)
        if parsed.stream:
            return _EventStream(_stream(call, responder, request), call)
        try:
            answer = await _answer(call, request)
        finally:
            call.close()
        if answer is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(responder.completion(answer))

    @app.post("/v1/dama/judge", dependencies=[Depends(authorized)])
    async def judge(request: Request) -> dict[str, Any]:
        """Answers marked against an image's objects with the project's CHAIR matcher (the API's playground route
        forwards here: the matcher is engine code, and the API keeps none)."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ChatError("The request body is not valid JSON.", code="invalid_json") from None
        return await run_in_threadpool(_judge, body)

    return app


def _judge(body: Any) -> dict[str, Any]:
    """``{"objects": [...], "vocabulary": {...}, "answers": [...]}`` -> ``{"judgements": [mark_response(...)]}``."""
    from dama_engine.data import VocabularyError, mark_response
    from dama_engine.serving import ChatError

    if not isinstance(body, dict):
        raise ChatError("The body is a JSON object: objects, vocabulary, answers.", code="invalid_request_body")
    objects, vocabulary, answers = body.get("objects"), body.get("vocabulary"), body.get("answers")
    if not (isinstance(objects, list) and all(isinstance(name, str) for name in objects)):
        raise ChatError("objects: a list of object names.", param="objects")
    if not isinstance(vocabulary, dict):
        raise ChatError("vocabulary: the generative set's vocabulary (a JSON object).", param="vocabulary")
    if not (isinstance(answers, list) and all(isinstance(answer, str) for answer in answers)):
        raise ChatError("answers: a list of strings.", param="answers")
    try:
        return {"judgements": [mark_response(answer, objects, vocabulary) for answer in answers]}
    except VocabularyError as error:
        raise ChatError(f"vocabulary: {error}", param="vocabulary") from None


def main(argv: list[str] | None = None) -> int:
    """``dama infer [--host H] [--port P]``: serve the backend with uvicorn until interrupted."""
    settings = Settings()
    parser = argparse.ArgumentParser(
        prog="dama infer", description="The OpenAI-compatible inference backend the API forwards /v1 requests to."
    )
    parser.add_argument("--host", default=settings.infer_host, help=f"bind address (default {settings.infer_host})")
    parser.add_argument("--port", type=int, default=settings.infer_port, help=f"port (default {settings.infer_port})")
    args = parser.parse_args(argv)
    if not settings.inference_secret:
        print(
            "dama infer: DAMA_INFERENCE_SECRET is empty; set it to the secret the API sends (refusing to start an "
            "inference backend anyone could use)",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from dama_engine.threads import apply_threads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)  # first: it points the hub cache at the model cache before torch is imported
    apply_threads()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
