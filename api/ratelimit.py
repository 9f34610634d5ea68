"""Per-tenant request rate limits (``DAMA_RATE_LIMIT``), counted with the ``limits`` library.

Every authenticated request counts against its tenant (all of the tenant's API keys together), on each limit of
``DAMA_RATE_LIMIT`` (default ``6000/minute``; e.g. ``600/minute;20/second``; moving windows). Over a limit the
request is answered 429 ``rate_limit_exceeded`` with ``Retry-After`` (seconds) and ``X-RateLimit-Limit`` /
``-Remaining`` / ``-Reset`` headers, as hosted APIs do; nothing it would have done is done. Counters live in
``DAMA_RATE_LIMIT_STORAGE``: ``memory://`` counts per API process (the embedded default, one process); a Redis
URL shares them between API replicas (docker-compose.yml uses the broker's Redis, another database number).

The same counters throttle guessing: requests with an invalid API key count per client address
(``DAMA_AUTH_FAILURE_LIMIT``); an address past it gets 429 ``too_many_failed_authentications`` before its key is
looked up, so a flood of bad keys costs no database queries.

If the counter store is unreachable or slow (Redis answers within 100 ms or not at all), the request goes through
and the limiter skips the store for ``OUTAGE_BACKOFF_S`` with one logged warning: a rate limiter that turns a
Redis hiccup into an outage of the whole API does more harm than the traffic it would have stopped. The chat limits
(``DAMA_CHAT_RATE_LIMIT``, ``DAMA_CHAT_TOKEN_LIMIT``) are the exception: they guard GPU time, so they fail closed
(``fail_closed``: 503 ``rate_limiter_unavailable`` while the store is unreachable, nothing generated).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from api.errors import ApiError

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 0.1
OUTAGE_BACKOFF_S = 10.0


class RateLimiter:
    """The limits of ``spec`` over the counter store at ``storage_uri``, counted per key in ``namespace``.

    ``setting`` names the variable ``spec`` came from (in errors); ``code`` and ``what`` make the 429's code and
    message (``what``: whose requests are counted, e.g. "this account").

    Raises:
        ValueError: ``spec`` is not in the ``limits`` notation (the message names ``setting``).
    """

    def __init__(
        self,
        spec: str,
        storage_uri: str,
        *,
        setting: str = "DAMA_RATE_LIMIT",
        namespace: str = "tenant",
        code: str = "rate_limit_exceeded",
        what: str = "this account",
        unit: str = "requests",
        fail_closed: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec.strip()
        try:
            self.items: list[RateLimitItem] = parse_many(self.spec) if self.spec else []
        except ValueError as error:
            raise ValueError(
                f"{setting} {spec!r} is not a rate limit: use e.g. '600/minute;20/second' ({error})"
            ) from None
        self._limiter: MovingWindowRateLimiter | None = None
        if self.items:
            options: dict[str, Any] = {}
            if storage_uri.startswith(("redis://", "rediss://")):
                options = {"socket_timeout": STORE_TIMEOUT_S, "socket_connect_timeout": STORE_TIMEOUT_S}
            self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri, **options))
        self._namespace, self._code, self._what, self._unit = namespace, code, what, unit
        self._fail_closed = fail_closed
        self._clock = clock
        self._skip_until = -math.inf
        self._lock = threading.Lock()

    def check(self, key: str, cost: int = 1) -> None:
        """Count ``cost`` (one request, or the tokens it reserves) for ``key``; raise a 429 :class:`ApiError` when
        a limit would be exceeded.

        A request refused by one limit is counted against none (every limit is tested before any is hit)."""
        self._guarded(key, test=True, hit=True, cost=cost)

    def refuse_if_exhausted(self, key: str) -> None:
        """Raise the 429 if ``key`` has used up a limit, without counting this request."""
        self._guarded(key, test=True, hit=False)

    def count(self, key: str) -> None:
        """Count one request of ``key`` (refused or not: it happened)."""
        self._guarded(key, test=False, hit=True)

    def _guarded(self, key: str, *, test: bool, hit: bool, cost: int = 1) -> None:
        limiter = self._limiter
        if limiter is None:
            return
        if self._clock() < self._skip_until:
            if self._fail_closed:
                raise _store_down()
            return
        try:
            for item in self.items if test else ():
                if cost > item.amount:
                    raise _never_fits(item, cost, unit=self._unit, what=self._what)
                if not limiter.test(item, self._namespace, key, cost=cost):
                    reset_at, _ = limiter.get_window_stats(item, self._namespace, key)
                    raise _too_many(item, reset_at, code=self._code, what=self._what, unit=self._unit)
            for item in self.items if hit else ():
                # The moving window's hit is the atomic check: another replica may have taken the room since the
                # test (a request refused here is not counted).
                if not limiter.hit(item, self._namespace, key, cost=cost) and test:
                    reset_at, _ = limiter.get_window_stats(item, self._namespace, key)
                    raise _too_many(item, reset_at, code=self._code, what=self._what, unit=self._unit)
        except ApiError:
            raise
        except Exception as error:  # the counter store is down or slow: let requests through for a while
            with self._lock:
                if self._clock() >= self._skip_until:
                    log.warning(
                        "rate limit counters unreachable (%s); not counting requests for %.0f s",
                        error,
                        OUTAGE_BACKOFF_S,
                    )
                    self._skip_until = self._clock() + OUTAGE_BACKOFF_S
            if self._fail_closed:
                raise _store_down() from None


def _store_down() -> ApiError:
    return ApiError(
        503,
        "rate_limiter_unavailable",
        "the rate limiter's counter store is unreachable, and this route does not run unmetered; retry shortly",
        headers={"Retry-After": str(math.ceil(OUTAGE_BACKOFF_S))},
    )


def _never_fits(item: RateLimitItem, cost: int, *, unit: str, what: str) -> ApiError:
    return ApiError(
        400,
        "request_over_limit",
        f"this request reserves {cost} {unit}, more than the limit of {item.amount} per {_window(item)} for {what}; "
        "ask for fewer (max_tokens)",
        param="max_tokens",
    )


def _too_many(item: RateLimitItem, reset_at: float, *, code: str, what: str, unit: str = "requests") -> ApiError:
    retry_after = max(1, math.ceil(reset_at - time.time()))
    return ApiError(
        429,
        code,
        f"too many {unit}: the limit is {item.amount} per {_window(item)} for {what}; retry in {retry_after} s",
        headers={
            "Retry-After": str(retry_after),
            "X-RateLimit-Limit": str(item.amount),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(math.ceil(reset_at)),
        },
    )


def _window(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    return unit if item.multiples == 1 else f"{item.multiples} {unit}s"
