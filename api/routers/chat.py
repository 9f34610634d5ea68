"""``/v1``: chat with base and tuned models in OpenAI's Chat Completions protocol.

The official ``openai`` package works with ``base_url=<service>/v1`` and a service API key. The routes are thin:
:mod:`api.services.chat` checks the tenant, the model and every image, applies the chat limits, and forwards to the
inference backend.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.chat_schemas import ChatCompletionCreate, ChatCompletionPublic, ChatModelList
from api.deps import CurrentTenant, ServicesDep, SessionDep
from api.responses import (
    CHAT_BACKEND_FAILED,
    CHAT_INVALID,
    CHAT_LIMITED,
    CHAT_MODEL_NOT_FOUND,
    CHAT_MODEL_NOT_READY,
    CHAT_TIMEOUT,
    CHAT_TOO_LARGE,
    CHAT_UNAVAILABLE,
    UNAUTHORIZED,
)
from api.services import chat

router = APIRouter(prefix="/v1", tags=["chat"])

_COMPLETION_EXAMPLE = {
    "id": "chatcmpl-6f1c2d3e4b5a",
    "object": "chat.completion",
    "created": 1765148400,
    "model": "job_0193c1f0a2b4c5d6e7f8a9b0",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "A red circle above a blue square."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 601, "completion_tokens": 9, "total_tokens": 610},
}


@router.post(
    "/chat/completions",
    summary="Create a chat completion",
    description="OpenAI's Chat Completions: `messages` with text and `image_url` parts (base64 data URIs; http(s) "
    "URLs only from hosts the operator allows), `model` a base (GET /v1/models), `job_...` or `job_...:STEP`. "
    "`stream: true` answers server-sent `chat.completion.chunk` events ending `data: [DONE]`; an error after the "
    'stream started comes as a `data: {"error": ...}` event and the stream ends. Tokens count against the '
    "tenant's chat limits (max_tokens reserved up front) and are recorded (GET /usage).",
    responses={
        200: {
            "model": ChatCompletionPublic,
            "description": "The completion (JSON), or with `stream: true` a `text/event-stream` of chunks.",
            "content": {"application/json": {"example": _COMPLETION_EXAMPLE}, "text/event-stream": {}},
        },
        400: CHAT_INVALID,
        401: UNAUTHORIZED,
        404: CHAT_MODEL_NOT_FOUND,
        409: CHAT_MODEL_NOT_READY,
        413: CHAT_TOO_LARGE,
        429: CHAT_LIMITED,
        502: CHAT_BACKEND_FAILED,
        503: CHAT_UNAVAILABLE,
        504: CHAT_TIMEOUT,
    },
)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, tenant: CurrentTenant, services: ServicesDep
) -> Any:
    prepared = await chat.prepare(services, tenant_id=tenant.id, body=body)
    if not prepared.stream:
        return JSONResponse(await chat.complete(services, tenant_id=tenant.id, prepared=prepared, request=request))
    chunks = await chat.open_stream(services, tenant_id=tenant.id, prepared=prepared)
    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/models",
    summary="List the models this tenant may chat with",
    description="The built-in models and the bases the operator allows, then this tenant's succeeded training jobs "
    "(`job_...`; a kept checkpoint is `job_...:STEP`). Another tenant's jobs never appear.",
    responses={401: UNAUTHORIZED},
)
def list_chat_models(session: SessionDep, tenant: CurrentTenant, services: ServicesDep) -> ChatModelList:
    return chat.list_models(session, services, tenant=tenant)
