"""Where webhooks may go (``jobstore.webhooks.check_url`` / ``refused_address``), and the signature format:
pure functions, no network (no name is resolved)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

import pytest
import standardwebhooks

from jobstore.webhooks import check_url, new_secret, parse_allowed_hosts, refused_address, sign


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.2", "a loopback address"),
        ("10.20.30.40", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a link-local address"),  # cloud metadata services
        ("100.64.0.1", "a non-public address"),  # carrier-grade NAT
        ("224.0.0.251", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("0.0.0.0", "an unspecified address"),
        ("::1", "a loopback address"),
        ("fe80::1%eth0", "a link-local address"),
        ("fc00::1", "a private address"),
        ("::ffff:10.0.0.1", "a private address"),  # IPv4-mapped: judged as the IPv4 address
        ("ff02::1", "a multicast address"),
    ],
)
def test_non_public_addresses_are_refused(address: str, kind: str) -> None:
    assert refused_address(address) == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_accepted(address: str) -> None:
    assert refused_address(address) is None


def test_urls_are_judged_without_resolving_names() -> None:
    assert check_url("https://hooks.example.com/x", allowed_hosts=()) is None  # names are checked at delivery
    assert check_url("http://8.8.8.8:8080/", allowed_hosts=()) is None
    assert check_url("http://10.0.0.1/", allowed_hosts=()) == (
        "10.0.0.1 is a private address (not on DAMA_WEBHOOK_ALLOWED_HOSTS)"
    )
    allowed = parse_allowed_hosts(" 127.0.0.1, LocalHost ,[::1]")
    assert allowed == {"127.0.0.1", "localhost", "::1"}
    for url in ("http://127.0.0.1:8000/hook", "http://localhost/", "http://[::1]:9/"):
        assert check_url(url, allowed_hosts=allowed) is None
    assert check_url("http://127.0.0.2/", allowed_hosts=allowed) is not None  # the host, not the network
    assert check_url("http://a.b:99999/", allowed_hosts=()) is not None


def test_the_signature_is_standard_webhooks_v1() -> None:
    secret = new_secret()
    body = b'{"type":"job.succeeded"}'
    header = sign(secret=secret, message_id="msg_1", timestamp=1_700_000_000, body=body)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    assert header == "v1," + base64.b64encode(expected).decode()
    # The reference library computes the same (its verify also checks the timestamp, so sign() is compared).
    reference = standardwebhooks.Webhook(secret).sign(
        "msg_1", datetime.fromtimestamp(1_700_000_000, UTC), body.decode()
    )
    assert header == reference
