"""A reader of ``text/event-stream`` bodies (the WHATWG format the API's event routes send)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


def parse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Events from the stream's lines; comments (the server's keep-alive pings) are skipped."""
    event, last_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event=event, data="\n".join(data), id=last_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value
    if data:
        yield ServerSentEvent(event=event, data="\n".join(data), id=last_id)
