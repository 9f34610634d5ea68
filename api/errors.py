"""Every error the API answers has one shape: ``{"error": {"type", "code", "message", "param"}}``.

Routes raise :class:`ApiError`; the handlers installed by :func:`install_error_handlers` turn it, FastAPI's request
validation errors, Starlette's HTTP errors (unknown route, wrong method) and anything unexpected into that shape.
A user's bad input is always a 4xx with a message that says what to change; an unexpected fault is a 500 that
names no internals (the traceback goes to the log, not to the client).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from jobstore.redact import redact_json, redact_paths

logger = logging.getLogger(__name__)

# The error type by HTTP status: a client can branch on the type without parsing messages.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "service_unavailable_error",
}

# Locations FastAPI puts first in a validation error's ``loc``; ``param`` leaves them out.
_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with ``status_code``."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.param = param
        self.errors = [dict(error) for error in errors] if errors is not None else None
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status_code, "invalid_request_error" if self.status_code < 500 else "api_error")

    def body(self) -> dict[str, Any]:
        # Messages may quote an engine or OS error naming a file: the tenant sees its name, not the server's path.
        message = redact_paths(self.message)
        error: dict[str, Any] = {"type": self.type, "code": self.code, "message": message, "param": self.param}
        if self.errors is not None:
            error["errors"] = redact_json(self.errors)
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers or None)


def not_found(resource: str, resource_id: str, *, param: str | None = None) -> ApiError:
    """404 for an id that does not exist *or belongs to another tenant*: the two are indistinguishable."""
    return ApiError(404, f"{resource}_not_found", f"no {resource} with id {resource_id!r}", param=param)


def field_path(loc: Sequence[str | int]) -> str | None:
    """``("body", "hyperparameters", "learning_rate")`` -> ``"hyperparameters.learning_rate"``; list indices as
    ``[i]`` (``lora.target_modules[0]``); None for the body as a whole."""
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _validation_message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    # pydantic prefixes errors raised in validators; the rest of the message is the validator's own.
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


# OpenAI's protocol (the /v1 routes) answers every invalid request 400; a parameter it does not run is
# ``unsupported_parameter`` (pydantic's extra_forbidden, or a validator's own error of that type).
_OPENAI_PREFIX = "/v1/"
_UNSUPPORTED = frozenset({"extra_forbidden", "unsupported_parameter"})


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    openai = request.url.path.startswith(_OPENAI_PREFIX)
    problems: list[dict[str, Any]] = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            problems.append(
                {
                    "param": None,
                    "code": "invalid_json",
                    "message": f"the request body is not valid JSON: {error['msg']}",
                }
            )
            continue
        code, message = str(error.get("type", "invalid")), _validation_message(error)
        if openai:
            if code == "extra_forbidden":
                message = "this service does not support this parameter"
            code = "unsupported_parameter" if code in _UNSUPPORTED else "invalid_value"
        problems.append({"param": field_path(loc), "code": code, "message": message})
    if not problems:  # never seen in practice; keep the shape anyway
        problems.append({"param": None, "code": "invalid", "message": "the request is not valid"})
    first = problems[0]
    message = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''}; see error.errors)"
    if first["code"] == "invalid_json":  # not a JSON document at all: a malformed request, not a bad value
        return ApiError(400, "invalid_json", message, errors=problems).response()
    if openai:
        return ApiError(400, first["code"], message, param=first["param"], errors=problems).response()
    return ApiError(422, "validation_error", message, param=first["param"], errors=problems).response()


# Methods a path may answer, in the order ``Allow`` lists them.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers at this request's path. Starlette's 405 names the methods of the first
    route whose path matched; FastAPI has one route per method, so that was one method of several. A path the API
    documents literally (``/jobs/estimate``) is that resource alone, even where another resource's templated path
    matches it too (``/jobs/{job_id}``): its documented methods."""
    documented = request.app.openapi().get("paths", {}).get(request.url.path)
    if documented is not None:
        return [method for method in _METHODS if method.lower() in documented]
    routes = request.app.router.routes
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in routes):
            allowed.append(method)
    return allowed


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    codes = {404: "route_not_found", 405: "method_not_allowed", 413: "request_too_large"}
    try:
        phrase = HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        phrase = "http_error"
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    headers = dict(exc.headers) if exc.headers else {}
    if status == 405:  # RFC 9110: Allow lists every method of the resource; OPTIONS is answered the same way
        headers["Allow"] = ", ".join(allowed_methods(request))
        message = f"{request.method} is not allowed on this path; it answers {headers['Allow']}"
    return ApiError(status, codes.get(status, phrase), message, headers=headers).response()


async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
    logger.error("database unavailable: %s", exc)
    return ApiError(503, "database_unavailable", "the job store is unavailable; retry shortly").response()


async def _store_down(_request: Request, exc: Exception) -> JSONResponse:
    # The S3 artifact store is unreachable, or refuses this installation's credentials or bucket: the operator's to
    # fix (or a blink), never the request's.
    logger.error("artifact store unavailable: %s", exc)
    return ApiError(
        503,
        "artifact_store_unavailable",
        "the artifact store is unavailable; retry shortly",
        headers={"Retry-After": "30"},
    ).response()


async def _client_gone(request: Request, _exc: Exception) -> JSONResponse:
    # The client hung up mid-request (an upload cancelled): nothing to answer and nothing went wrong here; the
    # route's own cleanup has run. Handled here, it is not logged as an error of the application.
    logger.info("client disconnected during %s %s", request.method, request.url.path)
    return ApiError(400, "client_disconnected", "the client disconnected before the request was complete").response()


async def _unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    # The last line of defence: inputs are validated before they reach the job store, but a value PostgreSQL
    # refuses (a NUL character in text, a number out of its column's range) is the request's fault, not a 500.
    logger.warning("%s %s: the job store refused a value: %s", request.method, request.url.path, exc)
    return ApiError(
        400,
        "invalid_value",
        "a value in the request cannot be stored (a NUL character, or a number out of range); check the ids, "
        "parameters and strings sent",
    ).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal_error", "an unexpected error occurred; it has been logged").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(BotoCoreError, _store_down)
    app.add_exception_handler(ClientError, _store_down)
    app.add_exception_handler(DataError, _unstorable_value)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
