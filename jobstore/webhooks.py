"""Webhooks, the parts the API and the workers share: event types, the retry schedule, signing, and where a
webhook may be sent.

Signing follows the Standard Webhooks specification (https://www.standardwebhooks.com): the signed content is
``{webhook-id}.{webhook-timestamp}.{body}``, the key is the base64 part of the endpoint's ``whsec_`` secret, and
``webhook-signature`` is ``v1,<base64 HMAC-SHA256>``; receivers verify with the ``standardwebhooks`` library.

Where webhooks may go: ``http`` and ``https`` URLs whose host resolves to public addresses only. Private,
loopback, link-local, multicast and reserved addresses (anything Python's :mod:`ipaddress` does not call
global) are refused, unless the host is on the operator's allow-list (``DAMA_WEBHOOK_ALLOWED_HOSTS``). The API
refuses literal addresses and ``localhost`` names when an endpoint is created (it resolves no names: a tenant's
URL must not make the API process look anything up); the dispatcher checks the resolved addresses again before
every attempt and connects to the address it checked (no second lookup that DNS rebinding could answer
differently), and follows no redirects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

# The job statuses that are announced, and the event type prefix per job kind (see jobstore.repository).
ANNOUNCED_STATUSES = ("running", "succeeded", "failed", "cancelled")
EVENT_PREFIXES = {
    "training": "job",
    "evaluation": "evaluation",
    "pair_generation": "pair_generation",
    "loop": "loop",
}
# A loop's round evaluated: its held-out metrics (jobstore.loops), besides the loop's own status changes.
LOOP_ROUND_COMPLETED = "loop.round_completed"
EVENT_TYPES = (
    *(f"{prefix}.{status}" for prefix in EVENT_PREFIXES.values() for status in ANNOUNCED_STATUSES),
    LOOP_ROUND_COMPLETED,
)
# Stored as an endpoint's event types when it was created without a list: every event type, those added later
# (new run kinds) included. An explicit list receives only what it names.
ALL_EVENTS = "*"


def subscribes(event_types: Iterable[str], event_type: str) -> bool:
    """Whether an endpoint with these stored event types receives ``event_type``."""
    stored = list(event_types)
    return ALL_EVENTS in stored or event_type in stored


def public_event_types(event_types: Iterable[str]) -> list[str]:
    """The event types an endpoint receives today (``ALL_EVENTS`` spelled out as the current list)."""
    stored = list(event_types)
    return list(EVENT_TYPES) if ALL_EVENTS in stored else stored


# Seconds to wait after the 1st, 2nd, ... failed attempt (Standard Webhooks' / Svix's schedule): 8 attempts over
# about 27.6 hours. A message whose last attempt fails is ``failed``.
RETRY_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
# An endpoint is disabled after this many messages in a row exhausted every retry (no delivery succeeded in
# between): with the default schedule, after at least 27.6 hours of failing.
DISABLE_AFTER = 5

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """``whsec_`` + base64 of 24 random bytes, the format Standard Webhooks' libraries accept."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(*, secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for ``body`` sent as ``message_id`` at ``timestamp`` (Unix s)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    content = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def parse_allowed_hosts(value: str | None) -> frozenset[str]:
    """``DAMA_WEBHOOK_ALLOWED_HOSTS`` ("127.0.0.1,localhost") as lower-case host names / addresses."""
    return frozenset(host.strip().lower().strip("[]") for host in (value or "").split(",") if host.strip())


def url_host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def refused_address(address: str) -> str | None:
    """What kind of address ``address`` is if a webhook may not connect to it ("a loopback address"), else None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_multicast or not ip.is_global:
        kind = next(
            (
                name
                for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private")
                if getattr(ip, f"is_{name}")
            ),
            "non-public",
        )
        return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind.replace('_', '-')} address"
    return None


def check_url(url: str, *, allowed_hosts: Iterable[str]) -> str | None:
    """Why ``url`` cannot be a webhook endpoint, judged without resolving names (None: acceptable)."""
    try:
        parts = urlsplit(url)
        host, _port = (parts.hostname or "").lower(), parts.port
    except ValueError as error:
        return f"is not a valid URL ({error})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not host:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@)"
    if host in set(allowed_hosts):
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is the loopback host (not on DAMA_WEBHOOK_ALLOWED_HOSTS)"
    try:
        reason = refused_address(host)
    except ValueError:
        return None  # a name: its addresses are checked when a delivery resolves it
    return f"{host} is {reason} (not on DAMA_WEBHOOK_ALLOWED_HOSTS)" if reason else None


class RefusedTarget(Exception):
    """The host is not a place the service may connect to (a webhook endpoint, a chat image's URL)."""


def pinned_address(
    host: str, port: int, *, allowed_hosts: frozenset[str], setting: str = "DAMA_WEBHOOK_ALLOWED_HOSTS"
) -> str:
    """The address to connect to for ``host``: resolved once, every address checked (a name with one private
    address among public ones is refused: which one a client picks is not ours to know)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise RefusedTarget(f"cannot resolve {host}: {error.strerror}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise RefusedTarget(f"{host} has no address")
    if host not in allowed_hosts:
        for address in addresses:
            reason = refused_address(address)
            if reason is not None:
                raise RefusedTarget(f"refused: {host} resolves to {address}, {reason} (not on {setting})")
    return addresses[0]
