"""Typed errors: every API error answer ``{"error": {"type", "code", "message", "param"}}`` becomes an
:class:`APIError` subclass chosen by its ``type``; transport failures are :class:`APIConnectionError`."""

from __future__ import annotations

from typing import Any


class DamaError(Exception):
    """Base of every error this client raises."""


class APIConnectionError(DamaError):
    """The service could not be reached (or stopped answering) after every retry."""


class APITimeoutError(APIConnectionError):
    """A request ran past its timeout after every retry."""


class ChecksumError(DamaError):
    """A download's bytes do not match the sha256 the service announced."""


class APIError(DamaError):
    """An error answer of the API, with its HTTP status and the body's ``type``, ``code``, ``message``, ``param``."""

    def __init__(
        self,
        status_code: int,
        *,
        type: str,
        code: str,
        message: str,
        param: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (param: {param})" if param else ""))
        self.status_code = status_code
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.errors = errors
        self.headers = headers or {}


class InvalidRequestError(APIError):
    """400, 405, 415, 422: the request is wrong; ``param`` names the field at fault."""


class AuthenticationError(APIError):
    """401: missing, unknown or revoked API key."""


class NotFoundError(APIError):
    """404: no such resource for this tenant."""


class ConflictError(APIError):
    """409: the resource is not in a state that allows this (e.g. no adapter yet)."""


class RequestTooLargeError(APIError):
    """413: the body is over a limit."""


class RateLimitError(APIError):
    """429 after every retry."""


class ServiceUnavailableError(APIError):
    """503 after every retry."""


class InternalServerError(APIError):
    """500 or another server fault."""


_BY_TYPE: dict[str, type[APIError]] = {
    "invalid_request_error": InvalidRequestError,
    "authentication_error": AuthenticationError,
    "not_found_error": NotFoundError,
    "conflict_error": ConflictError,
    "request_too_large": RequestTooLargeError,
    "rate_limit_error": RateLimitError,
    "service_unavailable_error": ServiceUnavailableError,
    "api_error": InternalServerError,
}


def error_from_response(status_code: int, body: Any, headers: dict[str, str]) -> APIError:
    """The typed error of an error answer; a body that is not the API's shape (a proxy's page) still gives one."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": str(body)[:500] if body else f"HTTP {status_code}", "code": f"http_{status_code}"}
    error_type = str(detail.get("type") or ("api_error" if status_code >= 500 else "invalid_request_error"))
    cls = _BY_TYPE.get(error_type, InternalServerError if status_code >= 500 else InvalidRequestError)
    return cls(
        status_code,
        type=error_type,
        code=str(detail.get("code") or f"http_{status_code}"),
        message=str(detail.get("message") or ""),
        param=detail.get("param"),
        errors=detail.get("errors"),
        headers=headers,
    )
