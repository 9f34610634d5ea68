"""Checks every request passes before any route runs (an ASGI middleware): bounded request bodies, and no NUL
character where the job store would receive it.

* A request body over ``DAMA_MAX_JSON_BODY_BYTES`` is answered 413 ``request_too_large`` (by its Content-Length
  at once, or as soon as a chunked body passes the limit), so a huge job spec never reaches memory whole. Dataset
  uploads (``POST /datasets``) stream to disk under their own limit (``DAMA_MAX_UPLOAD_BYTES``) and are exempt;
  paths under a prefix of ``prefix_limits`` have their own limit (``/v1/``: chat requests carry images inline).
* A NUL character (``%00``) in the path or a query parameter is answered 400 ``invalid_characters`` naming the
  parameter: no id, cursor or metric key holds one, and PostgreSQL refuses it in text (it would be a 500).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote_to_bytes

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError

# Routes whose bodies are streamed to disk by their own code under their own limit.
STREAMED_UPLOADS = frozenset({("POST", "/datasets")})


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit. An HTTPException, so that FastAPI's body reading
    passes it on (it turns other exceptions into a 400) to the handler in :mod:`api.errors`."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, detail=body_too_large_message(limit, setting))


def body_too_large_message(limit: int, setting: str = "DAMA_MAX_JSON_BODY_BYTES") -> str:
    return f"the request body is larger than {limit} bytes, the most this service accepts ({setting})"


class RequestGuard:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, prefix_limits: Mapping[str, tuple[int, str]] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.prefix_limits = dict(prefix_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = _nul_refusal(scope)
        if refusal is None and (scope["method"], scope["path"].rstrip("/") or "/") not in STREAMED_UPLOADS:
            limit, setting = self._limit(scope["path"])
            refusal = self._declared_size_refusal(scope, limit, setting)
            receive = self._counting(receive, limit, setting)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _limit(self, path: str) -> tuple[int, str]:
        for prefix, limit in self.prefix_limits.items():
            if path.startswith(prefix):
                return limit
        return self.max_body_bytes, "DAMA_MAX_JSON_BODY_BYTES"

    def _declared_size_refusal(self, scope: Scope, limit: int, setting: str) -> ApiError | None:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return ApiError(413, "request_too_large", body_too_large_message(limit, setting))
        return None

    def _counting(self, receive: Receive, limit: int, setting: str) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        return counted


def _nul_refusal(scope: Scope) -> ApiError | None:
    path: str = scope["path"]
    if "\x00" in path or b"%00" in scope.get("raw_path", b"").lower():
        return ApiError(400, "invalid_characters", "the request path holds a NUL character (%00); no id contains one")
    query: bytes = scope.get("query_string", b"")
    if b"\x00" not in unquote_to_bytes(query):
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            param = name.replace("\x00", "")
            return ApiError(
                400,
                "invalid_characters",
                f"{param}: the query parameter holds a NUL character (%00), which no value may contain",
                param=param or None,
            )
    return ApiError(400, "invalid_characters", "the query string holds a NUL character (%00)")
