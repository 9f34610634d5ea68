"""Per-tenant request rate limits (``DAMA_RATE_LIMIT``), counted with the ``limits`` library.

Every authenticated request counts against its tenant (all of the tenant's API keys together), on each limit of
``DAMA_RATE_LIMIT`` (default ``6000/minute``; e.g. ``600/minute;20/second``; moving windows). Over a limit the
request is answered 429 ``rate_limit_exceeded`` with ``Retry-After`` (seconds) and ``X-RateLimit-Limit`` /
``-Remaining`` / ``-Reset`` headers, as hosted APIs do; nothing it would have done is done. Counters live in
``DAMA_RATE_LIMIT_STORAGE``: ``memory://`` counts per API process (the embedded default, one process); a Redis
URL shares them between API replicas (docker-compose.yml uses the broker's Redis, another database number).

If the counter store is unreachable the request goes through (with a logged warning): a rate limiter that turns a
Redis hiccup into an outage of the whole API does more harm than the traffic it would have stopped.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from api.errors import ApiError

log = logging.getLogger(__name__)


class RateLimiter:
    """The limits of ``spec`` over the counter store at ``storage_uri``.

    Raises:
        ValueError: ``spec`` is not in the ``limits`` notation (the message names DAMA_RATE_LIMIT).
    """

    def __init__(self, spec: str, storage_uri: str) -> None:
        self.spec = spec.strip()
        try:
            self.items: list[RateLimitItem] = parse_many(self.spec) if self.spec else []
        except ValueError as error:
            raise ValueError(
                f"DAMA_RATE_LIMIT {spec!r} is not a rate limit: use e.g. '600/minute;20/second' ({error})"
            ) from None
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri)) if self.items else None

    def check(self, tenant_id: str) -> None:
        """Count one request of ``tenant_id``; raise a 429 :class:`ApiError` when a limit is exhausted."""
        if self._limiter is None:
            return
        for item in self.items:
            try:
                allowed = self._limiter.hit(item, "tenant", tenant_id)
                if allowed:
                    continue
                reset_at, _ = self._limiter.get_window_stats(item, "tenant", tenant_id)
            except Exception:  # the counter store is down: let the request through
                log.warning("rate limit counters unreachable; request not counted", exc_info=True)
                return
            retry_after = max(1, math.ceil(reset_at - time.time()))
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"too many requests: the limit is {item.amount} per {_window(item)} for this account; "
                f"retry in {retry_after} s",
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
