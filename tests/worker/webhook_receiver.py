"""A webhook receiver for tests: an HTTP server on 127.0.0.1 in a thread that records every request and answers
with the statuses it is told to (then 204). The only kind of place the tests send webhooks to."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time()

    def verified(self, secret: str) -> dict[str, object]:
        """The payload, once the reference Standard Webhooks library accepted its signature."""
        payload: dict[str, object] = standardwebhooks.Webhook(secret).verify(self.body, self.headers)
        return payload


class Receiver:
    def __init__(self, answers: Iterator[int] | None = None) -> None:
        self.requests: list[Received] = []
        self.answers = answers if answers is not None else iter(())
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body, time.time()))
                    status = next(receiver.answers, 204)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def keep_only_endpoints_of(session: object, tenant_id: str) -> None:
    """Delete every other tenant's webhook endpoints (and their outbox rows) from the test database, so the
    dispatchers these tests run can only ever send to the loopback receivers the tests made."""
    from sqlalchemy import delete
    from sqlalchemy.orm import Session

    from jobstore.models import WebhookEndpoint

    assert isinstance(session, Session)
    session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.tenant_id != tenant_id))
