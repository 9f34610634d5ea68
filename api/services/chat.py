"""Chat with base and tuned models (``/v1``): resolve what a tenant may call, check the request, forward it to the
inference backend and account for the tokens.

The API keeps no torch. A request is checked here (the tenant's right to the model, the parameters, every image
decoded and bounded, the chat rate limits, which fail closed) and then forwarded in OpenAI's protocol to an
inference backend, authenticated with ``DAMA_INFERENCE_SECRET``: `dama infer` (transformers + peft) by default,
or vLLM with multi-LoRA (``DAMA_INFERENCE_KIND=vllm``) for the models it can load. What the backend is asked for
is an opaque id (``job_...``, ``job_...:STEP``, a base's name; ``exp_<id>@<job_id>/attempt-<n>`` for a merged
export, which `dama infer` finds through the store's layout, ``ArtifactStore.export_archive``; for vLLM the
adapter's folder under the artifacts root, which its filesystem resolver loads); the answer is relabelled with the
tenant's own model name.

Tokens of every answered request are recorded per tenant (``GET /usage``); a stream the client left early counts
what the backend generated before it stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import anyio
import httpx
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.chat_images import check_image_url
from api.chat_schemas import (
    ChatCompletionCreate,
    ChatModel,
    ChatModelList,
    JudgeCreate,
    JudgePublic,
    UsageDay,
    UsagePublic,
)
from api.deps import Services
from api.errors import ApiError
from api.services import previews
from jobstore import exports, repository, usage
from jobstore.artifacts import ArtifactStore
from jobstore.db import session_scope
from jobstore.models import Export, Job, Tenant
from jobstore.spec import BUILTIN_MODELS, BUILTIN_PREFIX, INIT_ADAPTER_PATTERN, JobSpec, split_init_adapter
from jobstore.states import JobStatus

log = logging.getLogger(__name__)

EXPORT_MODEL = re.compile(r"^exp_[A-Za-z0-9]{1,60}$")
ATTEMPT_DIR = re.compile(r"^attempt-([0-9]{1,9})$")
# A prompt's tokens are not known before the backend tokenizes it: the token limit reserves this estimate plus
# max_tokens (the backend's count is what GET /usage reports).
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 256
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request looks whether its client is still there


@dataclass(frozen=True)
class Target:
    """Where one request goes: the tenant's model name, the backend's base URL and the id it is asked for."""

    name: str
    backend_url: str
    backend_model: str


def _model_not_found(name: str) -> ApiError:
    return ApiError(
        404,
        "model_not_found",
        f"the model {name!r} does not exist or you do not have access to it (GET /v1/models lists yours)",
        param="model",
    )


def chat_bases(services: Services) -> list[str]:
    """The base models tenants may call: the built-in models, then the operator's ``DAMA_CHAT_BASE_MODELS``."""
    extra = [name.strip() for name in services.settings.chat_base_models.split(",") if name.strip()]
    return [*BUILTIN_MODELS, *(name for name in extra if name not in BUILTIN_MODELS)]


def _backend(services: Services, *, vllm_can: bool, name: str) -> str:
    """The backend URL for a model (``vllm_can``: vLLM could load it), or 503/400 when there is none."""
    settings = services.settings
    if settings.inference_url is None:
        raise ApiError(
            503,
            "inference_unavailable",
            "no inference backend is configured on this service (DAMA_INFERENCE_URL); `dama serve` starts one",
            headers={"Retry-After": "60"},
        )
    if settings.inference_kind == "dama" or vllm_can:
        return settings.inference_url.rstrip("/")
    if settings.inference_fallback_url:
        return settings.inference_fallback_url.rstrip("/")
    raise ApiError(
        400,
        "model_not_servable",
        f"model: {name!r} is served by vLLM here, which cannot load it (a trained projector, a full fine-tune or a "
        "built-in model), and this service has no fallback backend (DAMA_INFERENCE_FALLBACK_URL)",
        param="model",
    )


def _export_backend_model(store: ArtifactStore, export: Export) -> str | None:
    """The id `dama infer` is asked for to serve a succeeded merged export: ``exp_<id>@<job_id>/attempt-<n>``, the
    run whose archive the row records, which the backend turns back into ``store.export_archive(job, export, n)``
    (it accepts nothing else: no path crosses). None when the recorded path is not that layout's archive."""
    if export.path is None:
        return None
    archive = store.local_path(export.path)
    attempt = ATTEMPT_DIR.match(archive.parent.name)
    if attempt is None:
        return None
    expected = store.export_archive(export.job_id, export.id, int(attempt.group(1)))
    if archive.resolve() != expected.resolve():
        return None
    return f"{export.id}@{export.job_id}/attempt-{int(attempt.group(1))}"


def _resolve_export(session: Session, services: Services, *, tenant_id: str, name: str) -> Target:
    """A merged export of the tenant's (``exp_...``): callable once it has succeeded, always on `dama infer` (with
    vLLM, the fallback: vLLM serves one base)."""
    export = exports.get_export(session, export_id=name)
    if export is None or export.tenant_id != tenant_id or export.format != "merged":
        raise _model_not_found(name)
    if repository.get_job(session, job_id=export.job_id, tenant_id=tenant_id, kind=repository.TRAINING) is None:
        raise _model_not_found(name)
    if export.status in (exports.QUEUED, exports.RUNNING):
        raise ApiError(
            409,
            "model_not_ready",
            f"model: export {name} is {export.status}; it can be called once it has succeeded",
            param="model",
        )
    backend_model = _export_backend_model(services.artifacts, export) if export.status == exports.SUCCEEDED else None
    if backend_model is None:  # failed (ask for the export again), or a row that names no archive of the layout
        raise _model_not_found(name)
    return Target(name, _backend(services, vllm_can=False, name=name), backend_model)


def resolve(session: Session, services: Services, *, tenant_id: str, name: str) -> Target:
    """What ``name`` means for this tenant, and where it runs; 404 for anything not theirs to call.

    ``name`` is a base (built-in or ``DAMA_CHAT_BASE_MODELS``), a succeeded training job (``job_...``), a kept
    checkpoint (``job_...:STEP``) or a succeeded merged export (``exp_...``). The backend is asked for the same
    name, except: a merged export is asked for as ``exp_<id>@<job_id>/attempt-<n>`` (the run that recorded its
    archive; `dama infer` fetches ``ArtifactStore.export_archive(job_id, exp_id, n)`` and accepts no other path),
    and vLLM gets an adapter as its folder relative to the artifacts root."""
    settings = services.settings
    bases = chat_bases(services)
    if name in bases:
        hub_base = name not in BUILTIN_MODELS
        return Target(name, _backend(services, vllm_can=hub_base, name=name), name)
    if EXPORT_MODEL.match(name):
        return _resolve_export(session, services, tenant_id=tenant_id, name=name)
    source = split_init_adapter(name) if re.fullmatch(INIT_ADAPTER_PATTERN, name) else None  # job_... or job_...:STEP
    if source is None:
        if name.startswith(BUILTIN_PREFIX):
            raise ApiError(
                404,
                "model_not_found",
                f"model: {name!r} is not a built-in model; the built-in models are {', '.join(BUILTIN_MODELS)}",
                param="model",
            )
        raise _model_not_found(name)
    job_id, step = source
    job = repository.get_job(session, job_id=job_id, tenant_id=tenant_id, kind=repository.TRAINING)
    if job is None:
        raise _model_not_found(name)
    spec = JobSpec.model_validate(job.spec)
    if spec.lora.enabled and spec.model not in bases:
        # The backend would load (download) the adapter's base: only the bases the operator serves, never a model
        # a tenant chose by training a small job on it.
        raise ApiError(
            400,
            "model_not_servable",
            f"model: job {job_id} is an adapter of {spec.model}, a base this service does not serve for chat (the "
            "operator lists those in DAMA_CHAT_BASE_MODELS; GET /v1/models)",
            param="model",
        )
    if spec.trust_remote_code and not settings.allow_remote_code:
        raise ApiError(
            400,
            "model_not_servable",
            f"model: job {job_id} needs trust_remote_code, which this service does not allow (DAMA_ALLOW_REMOTE_CODE)",
            param="model",
        )
    store = services.artifacts
    if step is None:
        if job.status != JobStatus.succeeded.value:
            raise ApiError(
                409,
                "model_not_ready",
                f"model: job {job_id} is {job.status}; its model can be called once it has succeeded (or call a kept "
                f"checkpoint: '{job_id}:STEP')",
                param="model",
            )
        folder = store.run_dir(job_id) / "adapter"
    else:
        checkpoint = repository.get_checkpoint(session, job_id=job_id, step=step)
        adapter_dir = store.checkpoint_adapter_dir(job_id, checkpoint.path) if checkpoint is not None else None
        if adapter_dir is None:
            kept = [item.step for item in repository.list_checkpoints(session, job_id=job_id)]
            raise ApiError(
                404,
                "model_not_found",
                f"model: job {job_id} has no kept checkpoint with an adapter at step {step} (kept: {kept or 'none'})",
                param="model",
            )
        folder = adapter_dir
    vllm_can = spec.vllm_loadable and spec.model in bases and spec.model not in BUILTIN_MODELS
    url = _backend(services, vllm_can=vllm_can, name=name)
    if settings.inference_kind == "vllm" and vllm_can:
        # vLLM's filesystem resolver loads <its LoRA folder>/<name>: the adapter's folder under the artifacts root.
        return Target(name, url, folder.relative_to(store.root).as_posix())
    return Target(name, url, name)


def list_models(session: Session, services: Services, *, tenant: Tenant) -> ChatModelList:
    """The bases every tenant may call, then this tenant's succeeded training jobs, then its succeeded merged exports
    (``exp_...``, ``base_model`` the job's model), each newest first."""
    models = [ChatModel(id=name, created=0, owned_by="dama") for name in chat_bases(services)]
    jobs: list[Job] = []
    after: str | None = None
    while True:
        page, more = repository.list_jobs(
            session,
            tenant_id=tenant.id,
            limit=500,
            after=after,
            status=JobStatus.succeeded.value,
            kind=repository.TRAINING,
        )
        jobs.extend(page)
        if not more or not page:
            break
        after = page[-1].id
    for job in jobs:
        spec = JobSpec.model_validate(job.spec)
        models.append(
            ChatModel(
                id=job.id,
                created=int(job.created_at.timestamp()),
                owned_by=tenant.name,
                base_model=spec.model,
                vllm_loadable=spec.vllm_loadable,
            )
        )
    for export, job in exports.succeeded_merged_exports(session, tenant_id=tenant.id):
        models.append(
            ChatModel(
                id=export.id,
                created=int(export.created_at.timestamp()),
                owned_by=tenant.name,
                base_model=JobSpec.model_validate(job.spec).model,
            )
        )
    return ChatModelList(data=models)


@dataclass(frozen=True)
class Prepared:
    """A checked request, ready to forward. ``prompt_estimate``: the prompt's tokens as the token limit reserved
    them, recorded when the backend's own count never arrives (a client that left a stream early)."""

    target: Target
    payload: dict[str, Any]
    stream: bool
    include_usage: bool
    prompt_estimate: int = 0


def _max_tokens(body: ChatCompletionCreate, cap: int) -> int:
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    wanted = body.max_completion_tokens or body.max_tokens or cap
    if wanted > cap:
        raise ApiError(
            400,
            "invalid_value",
            f"{param}: {wanted} is more than this service generates per request ({cap}, DAMA_CHAT_MAX_TOKENS)",
            param=param,
        )
    return wanted


async def prepare(services: Services, *, tenant_id: str, body: ChatCompletionCreate) -> Prepared:
    """Check the request (model, limits, images) and build what the backend receives."""
    settings = services.settings
    services.chat_limiter.check(tenant_id)

    def resolve_target() -> Target:
        with session_scope(services.session_factory) as session:
            return resolve(session, services, tenant_id=tenant_id, name=body.model)

    target = await run_in_threadpool(resolve_target)
    max_tokens = _max_tokens(body, settings.chat_max_tokens)
    messages: list[dict[str, Any]] = []
    images = characters = 0
    for m, message in enumerate(body.messages):
        if message.content is None or isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content or ""})
            characters += len(message.content or "")
            continue
        parts: list[dict[str, Any]] = []
        for p, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                characters += len(part.text)
                continue
            param = f"messages[{m}].content[{p}].image_url.url"
            images += 1
            if images > settings.chat_max_images:
                raise ApiError(
                    400,
                    "too_many_images",
                    f"{param}: a request may carry at most {settings.chat_max_images} images (DAMA_CHAT_MAX_IMAGES)",
                    param=param,
                )
            if message.role != "user":
                raise ApiError(400, "invalid_value", f"{param}: only user messages may carry images", param=param)
            checked = await check_image_url(part.image_url.url, param=param, settings=settings)
            parts.append({"type": "image_url", "image_url": {"url": checked.data_uri}})
        messages.append({"role": message.role, "content": parts})
    prompt_estimate = math.ceil(characters / CHARS_PER_TOKEN) + images * IMAGE_TOKENS
    services.chat_token_limiter.check(tenant_id, cost=max_tokens + prompt_estimate)
    payload: dict[str, Any] = {"model": target.backend_model, "messages": messages, "max_tokens": max_tokens}
    for field in ("temperature", "top_p", "seed"):
        value = getattr(body, field)
        if value is not None:
            payload[field] = value
    if body.stops:
        payload["stop"] = body.stops
    if body.stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}  # always: the service records the tokens
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Prepared(target, payload, body.stream, include_usage, prompt_estimate)


def _headers(services: Services) -> dict[str, str]:
    return {"Authorization": f"Bearer {services.settings.inference_secret}"}


def _backend_error(response_status: int, body: Any, headers: httpx.Headers) -> ApiError:
    """The backend's refusal as this API's error: its 4xx as they are (the request's fault), anything else a 502."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or f"the inference backend answered HTTP {response_status}")
    code = str(error.get("code") or "inference_error")
    param = error.get("param") if isinstance(error.get("param"), str) else None
    if response_status == 503:
        retry = {"Retry-After": headers.get("retry-after", "5")}
        return ApiError(503, code if code != "inference_error" else "inference_unavailable", message, headers=retry)
    if 400 <= response_status < 500 and response_status not in (401, 403):
        return ApiError(response_status, code, message, param=param)
    log.error("inference backend answered HTTP %s: %s", response_status, message)
    return ApiError(502, "inference_error", "the inference backend failed to answer; it has been logged")


def _unreachable(error: Exception) -> ApiError:
    if isinstance(error, httpx.PoolTimeout):  # every connection to the backend is busy: shed load, as it would
        return ApiError(
            503,
            "server_overloaded",
            "the model is answering too many requests; retry shortly",
            headers={"Retry-After": "2"},
        )
    if isinstance(error, httpx.TimeoutException | TimeoutError):
        return ApiError(504, "inference_timeout", "the model did not answer in time (DAMA_INFERENCE_TIMEOUT_S)")
    log.error("inference backend unreachable: %s", error)
    return ApiError(
        503,
        "inference_unavailable",
        "the inference backend is unreachable; retry shortly",
        headers={"Retry-After": "5"},
    )


def _record(services: Services, *, tenant_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
    try:
        with session_scope(services.session_factory) as session:
            usage.record(
                session,
                tenant_id=tenant_id,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
    except Exception:  # the answer was given: a lost usage row is logged, never turned into an error
        log.exception("could not record chat usage of tenant %s", tenant_id)


async def complete(services: Services, *, tenant_id: str, prepared: Prepared, request: Request) -> dict[str, Any]:
    """A non-streamed completion: forward, relabel, record its tokens. A client that hangs up while the model
    answers closes the API's request to the backend (which stops generating and frees its place), instead of
    leaving a whole answer generated for nobody (a client's timeout and retries would multiply it)."""
    target = prepared.target
    call = asyncio.ensure_future(
        services.inference.post(
            f"{target.backend_url}/chat/completions",
            json=prepared.payload,
            headers=_headers(services),
            timeout=services.settings.inference_timeout_s,
        )
    )
    try:
        while not call.done():
            await asyncio.wait({call}, timeout=DISCONNECT_POLL_S)
            if not call.done() and await request.is_disconnected():
                call.cancel()
                await run_in_threadpool(
                    _record,
                    services,
                    tenant_id=tenant_id,
                    model=target.name,
                    prompt_tokens=prepared.prompt_estimate,
                    completion_tokens=0,
                )
                raise ClientDisconnect()
        response = call.result()
    except httpx.HTTPError as error:
        raise _unreachable(error) from None
    finally:
        if not call.done():
            call.cancel()
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        raise _backend_error(response.status_code, body, response.headers)
    body["model"] = target.name
    reported = body.get("usage")
    counts: dict[str, Any] = reported if isinstance(reported, dict) else {}
    await run_in_threadpool(
        _record,
        services,
        tenant_id=tenant_id,
        model=target.name,
        prompt_tokens=int(counts.get("prompt_tokens") or 0),
        completion_tokens=int(counts.get("completion_tokens") or 0),
    )
    return body


def _event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def open_stream(services: Services, *, tenant_id: str, prepared: Prepared) -> AsyncIterator[bytes]:
    """A streamed completion: the backend's answer is opened first (so its refusal is still an HTTP error), then
    its chunks are relabelled and passed on as they come. An error after the first chunk is sent as an
    ``{"error": ...}`` event and the stream closed; a client that leaves closes the backend's stream (which stops
    generating and frees its slot)."""
    target = prepared.target
    deadline = time.monotonic() + services.settings.inference_timeout_s
    request = services.inference.build_request(
        "POST",
        f"{target.backend_url}/chat/completions",
        json=prepared.payload,
        headers=_headers(services),
        timeout=services.settings.inference_timeout_s,
    )
    try:
        response = await services.inference.send(request, stream=True)
    except httpx.HTTPError as error:
        raise _unreachable(error) from None
    if response.status_code != 200:
        try:
            body = json.loads(await response.aread())
        except (ValueError, httpx.HTTPError):
            body = None
        finally:
            await response.aclose()
        raise _backend_error(response.status_code, body, response.headers)
    return _relay(services, tenant_id=tenant_id, prepared=prepared, response=response, deadline=deadline)


def _stream_error(chunk: dict[str, Any], headers: httpx.Headers) -> dict[str, Any]:
    """A backend's error event as this API's: the request's own faults (``invalid_request_error``) keep their code
    and message (paths redacted); anything else is a 502 ``inference_error``. vLLM's shape (``object: error``, the
    fields at the top) is read too."""
    nested = chunk.get("error")
    error: dict[str, Any] = nested if isinstance(nested, dict) else chunk
    if error.get("type") == "invalid_request_error":
        param = error.get("param") if isinstance(error.get("param"), str) else None
        code, message = str(error.get("code") or "invalid_value"), str(error.get("message") or "invalid request")
        return ApiError(400, code, message, param=param).body()["error"]
    return _backend_error(500, {"error": error}, headers).body()["error"]


async def _relay(
    services: Services, *, tenant_id: str, prepared: Prepared, response: httpx.Response, deadline: float
) -> AsyncIterator[bytes]:
    target = prepared.target
    prompt_tokens = completion_tokens = streamed = 0
    counted = False  # the backend's own count arrived (else: the prompt's estimate, one content chunk per token)
    lines = response.aiter_lines()
    try:
        while True:
            # The deadline bounds waiting for the backend only, never the client reading what was sent.
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    line = await anext(lines)
            except StopAsyncIteration:
                break
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                yield _event("[DONE]")
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk or chunk.get("object") == "error":
                yield _event({"error": _stream_error(chunk, response.headers)})
                return
            chunk["model"] = target.name
            counts = chunk.get("usage")
            if isinstance(counts, dict):
                prompt_tokens = int(counts.get("prompt_tokens") or 0)
                completion_tokens = int(counts.get("completion_tokens") or 0)
                counted = True
                if not chunk.get("choices"):
                    if prepared.include_usage:
                        yield _event(chunk)
                    continue
                if not prepared.include_usage:
                    chunk.pop("usage", None)
            elif any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                streamed += 1
            yield _event(chunk)
        early = ApiError(502, "inference_error", "the inference backend ended the stream early")
        yield _event({"error": early.body()["error"]})
    except (TimeoutError, httpx.HTTPError) as error:
        yield _event({"error": _unreachable(error).body()["error"]})
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()
            await run_in_threadpool(
                _record,
                services,
                tenant_id=tenant_id,
                model=target.name,
                prompt_tokens=prompt_tokens if counted else prepared.prompt_estimate,
                completion_tokens=completion_tokens if counted else streamed,
            )


def usage_summary(session: Session, *, tenant_id: str, start_date: date | None, end_date: date | None) -> UsagePublic:
    """The tenant's chat usage by UTC day and model, ``start_date`` to ``end_date`` inclusive (default: the 30 days
    up to today; a start after the end is an empty range)."""
    end = min(end_date or datetime.now(UTC).date(), date.max - timedelta(days=1))  # the range ends the day after
    start = start_date or end - timedelta(days=29)
    lines = (
        []
        if start > end
        else usage.summary(
            session,
            tenant_id=tenant_id,
            start=datetime.combine(start, datetime.min.time(), UTC),
            end=datetime.combine(end + timedelta(days=1), datetime.min.time(), UTC),
        )
    )
    days = [
        UsageDay(
            date=line.day.isoformat(),
            model=line.model,
            requests=line.requests,
            prompt_tokens=line.prompt_tokens,
            completion_tokens=line.completion_tokens,
            total_tokens=line.prompt_tokens + line.completion_tokens,
        )
        for line in lines
    ]
    return UsagePublic(
        start_date=start.isoformat(),
        end_date=end.isoformat(),
        data=days,
        total_requests=sum(day.requests for day in days),
        total_prompt_tokens=sum(day.prompt_tokens for day in days),
        total_completion_tokens=sum(day.completion_tokens for day in days),
    )


async def judge(services: Services, session: Session, *, tenant_id: str, body: JudgeCreate) -> JudgePublic:
    """Mark answers against a generative row with the project's CHAIR matcher. The matcher is engine code: it runs
    in `dama infer` (``POST /v1/dama/judge`` there, with the shared secret), never in this torch-free API."""
    services.chat_limiter.check(tenant_id)  # the matcher runs on the inference backend: metered as a chat request
    preview, _ = await previews.preview(services, session, tenant_id, body.dataset_id)
    if preview.get("format") != "generative":
        raise ApiError(
            400,
            "not_generative",
            f"dataset_id: dataset {body.dataset_id} is not a generative set (images with the objects in each)",
            param="dataset_id",
        )
    entry = next((item for item in preview["rows"] if item["row"] == body.row), None)
    if entry is None:
        rows = [item["row"] for item in preview["rows"]] or [0]
        raise ApiError(
            404,
            "row_not_found",
            f"row: {body.row} is not among the dataset's preview rows ({rows[0]}..{rows[-1]})",
            param="row",
        )
    vocabulary = preview.get("vocabulary")
    if vocabulary is None:
        raise ApiError(
            409,
            "preview_outdated",
            "dataset_id: this dataset's preview was built before the playground marked answers; upload it again",
            param="dataset_id",
        )
    settings = services.settings
    url = settings.inference_url if settings.inference_kind == "dama" else settings.inference_fallback_url
    if url is None:
        raise ApiError(
            503,
            "inference_unavailable",
            "marking answers needs a `dama infer` backend (DAMA_INFERENCE_URL, or DAMA_INFERENCE_FALLBACK_URL with "
            "vLLM)",
            headers={"Retry-After": "60"},
        )
    payload = {"objects": entry["objects"], "vocabulary": vocabulary, "answers": body.answers}
    try:
        response = await services.inference.post(
            f"{url.rstrip('/')}/dama/judge", json=payload, headers=_headers(services)
        )
    except httpx.HTTPError as error:
        raise _unreachable(error) from None
    try:
        marked = response.json()
    except ValueError:
        marked = None
    if response.status_code != 200 or not isinstance(marked, dict):
        raise _backend_error(response.status_code, marked, response.headers)
    return JudgePublic(
        dataset_id=body.dataset_id, row=body.row, objects=list(entry["objects"]), judgements=marked["judgements"]
    )
