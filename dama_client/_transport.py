"""HTTP with the client's policies: auth, timeouts, retries with backoff, typed errors.

Retried: connection errors and timeouts, 429 (waiting what ``Retry-After`` says) and 503, up to ``max_retries``
times with exponential backoff and jitter; a POST or PATCH without an Idempotency-Key only when it cannot have
reached the server (a failed connect) or was refused with 429/503. A create call's ``Idempotency-Key`` is made
once by the caller and sent unchanged on every retry, so a retried create never makes a second resource.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from dama_client.errors import APIConnectionError, APITimeoutError, error_from_response

RETRY_STATUSES = frozenset({429, 503})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_BACKOFF_S = 30.0


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None without a usable one."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed is not None else None


class Transport:
    def __init__(
        self, *, base_url: str, api_key: str | None, timeout: float, max_retries: int, backoff_s: float
    ) -> None:
        headers = {"User-Agent": "dama-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Connect fails fast; reads may wait on long uploads and downloads, bounded by ``timeout``.
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self.http.close()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and (hinted := retry_after_s(response)) is not None:
            return min(hinted, MAX_BACKOFF_S)
        return min(self.backoff_s * 2**attempt, MAX_BACKOFF_S) * (0.5 + random.random() / 2)

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """Send with retries; yield the (unread, streaming) successful response; raise the typed error otherwise.

        A streamed body cannot be replayed: ``fresh`` (a callable returning request keyword arguments, e.g. an
        upload's ``files`` with the file rewound) is called before every attempt.
        """
        fresh = kwargs.pop("fresh", None)
        attempt = 0
        while True:
            if fresh is not None:
                kwargs.update(fresh())
            request = self.http.build_request(method, path, **kwargs)
            try:
                response = self.http.send(request, stream=True)
            except httpx.TransportError as error:  # timeouts included
                # A request that may have reached the server is resent only when resending cannot repeat its
                # effect: a read, or a create with its Idempotency-Key. One that never connected always is.
                unsent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
                replayable = unsent or method in SAFE_METHODS or "Idempotency-Key" in request.headers
                if attempt >= self.max_retries or not replayable:
                    kind = APITimeoutError if isinstance(error, httpx.TimeoutException) else APIConnectionError
                    raise kind(f"{method} {path}: {error or type(error).__name__}") from error
                time.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                response.close()
                time.sleep(self._delay(attempt, response))
                attempt += 1
                continue
            try:
                if response.status_code >= 400:
                    response.read()
                    try:
                        payload: Any = response.json()
                    except ValueError:
                        payload = response.text
                    raise error_from_response(response.status_code, payload, dict(response.headers))
                yield response
            finally:
                response.close()
            return

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send with retries and read the whole answer."""
        with self.stream(method, path, **kwargs) as response:
            response.read()
            return response
