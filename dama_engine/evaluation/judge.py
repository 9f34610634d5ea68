"""An optional LLM judge for generative answers (MMHal-Bench style), through any OpenAI-compatible chat endpoint.

Off by default and never needed by the tests of the rest of the engine. For each sample the judge sees the image
(as a data URI), the question, the objects that are truly in the image, and the model's answer, and rates it
0-6 as MMHal-Bench does (6: informative, no hallucination ... 0: not informative and hallucinated); a rating
below 3 counts as a hallucination. The client (httpx, which the model hub's client already brings) follows no
redirect and reads no reply longer than ``max_response_bytes`` or slower than ``timeout_s``: each such request
counts as a failure. :func:`chat_completion` is also the pair generations' object lister's client
(:mod:`dama_engine.pairs.labels`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dama_engine.data import GenerativeSample

_RATING = re.compile(r"rating\s*[:=]?\s*([0-6])\b", re.IGNORECASE)

JUDGE_PROMPT = """You are judging whether an AI assistant's answer about an image hallucinates.
Objects truly in the image: {objects}.
Question: {question}
Answer: {answer}

Rate the answer from 0 to 6:
6 - informative, no hallucination; 5 - somewhat informative, no hallucination; 4 - not informative, no
hallucination; 3 - informative, with hallucination; 2 - somewhat informative, with hallucination;
1 - not informative, with hallucination; 0 - not an answer.
A hallucination is any object, attribute or relation that the image does not show.
Reply with one line: "Rating: N"."""


class JudgeConfig(BaseModel):
    """Where the judge is. The key is given here, never read from the environment (entry points may fill it)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Base URL of an OpenAI-compatible API, e.g. https://host/v1 (…/chat/completions).")
    model: str = Field(description="The judge model's name at that endpoint.")
    name: str | None = Field(
        default=None, description="How errors and reports name this judge (default: its URL, which may be private)."
    )
    api_key: str | None = Field(default=None, description="Bearer key; the CLI takes DAMA_JUDGE_API_KEY when unset.")

    @field_validator("api_key")
    @classmethod
    def _bare_key(cls, key: str | None) -> str | None:
        """Surrounding whitespace dropped (a key read from a file ends with a newline); a key with a control
        character inside is refused (it could not be sent, and the HTTP library's error would quote it)."""
        if key is None:
            return None
        key = key.strip()
        if any(ord(character) < 32 or ord(character) == 127 for character in key):
            raise ValueError("the judge's api_key holds a control character")
        return key or None

    timeout_s: float = Field(
        default=60.0, gt=0, description="Seconds for the connection, and again for the whole reply to arrive."
    )
    max_tokens: int = Field(default=32, gt=0)
    max_response_bytes: int = Field(default=1_000_000, gt=0, description="A longer reply is an error.")


def parse_rating(text: str) -> int | None:
    """The 0-6 rating in a judge reply ("Rating: 5"), or a lone digit; None when there is none."""
    found = _RATING.search(text)
    if found:
        return int(found[1])
    digits = re.findall(r"\b([0-6])\b", text)
    return int(digits[0]) if len(digits) == 1 else None


class JudgeError(RuntimeError):
    """The judge endpoint answered in a way the judge does not follow (a redirect, an error status, a reply too
    long, too slow or not a chat completion)."""


def chat_completion(config: JudgeConfig, messages: list[dict[str, Any]], *, connect_to: str | None = None) -> str:
    """The assistant's text of one ``/chat/completions`` call at ``config.url`` (temperature 0).

    ``connect_to``: an address to connect to instead of resolving the URL's host (a caller that checked where the
    host resolves pins the address it checked: no second lookup); TLS still verifies the URL's host name, against
    the CA bundle of ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set. A pinned request goes through no proxy.

    Raises:
        JudgeError: a redirect (never followed), an error status, a reply longer than ``max_response_bytes`` or
            not whole within ``timeout_s``, or one that is not a chat completion.
        httpx.HTTPError: the connection failed.
    """
    url = config.url.rstrip("/") + "/chat/completions"
    label = config.name or config.url
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    extensions: dict[str, Any] = {}
    if connect_to is not None:
        parts = urlsplit(url)
        host = f"[{connect_to}]" if ":" in connect_to else connect_to
        headers["Host"] = parts.netloc.rsplit("@", 1)[-1]
        url = urlunsplit((parts.scheme, f"{host}:{parts.port}" if parts.port else host, parts.path, parts.query, ""))
        if parts.scheme == "https":
            extensions["sni_hostname"] = parts.hostname
    body = {"model": config.model, "messages": messages, "temperature": 0, "max_tokens": config.max_tokens}
    deadline = time.monotonic() + config.timeout_s
    # No proxy from the environment when the address is pinned (a proxy would resolve the name itself); the CA
    # bundle the environment names (SSL_CERT_FILE / SSL_CERT_DIR) is still used, as it is without a pin.
    verify: ssl.SSLContext | bool = True
    cafile, capath = os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None
    if connect_to is not None and (cafile or capath):
        verify = ssl.create_default_context(cafile=cafile, capath=capath)
    client = httpx.Client(timeout=config.timeout_s, follow_redirects=False, trust_env=connect_to is None, verify=verify)
    with client, client.stream("POST", url, json=body, headers=headers, extensions=extensions) as response:
        if response.is_redirect:
            where = response.headers.get("location", "?")
            raise JudgeError(
                f"judge {label}: answered {response.status_code} (a redirect to {where}); redirects are not followed"
            )
        if response.status_code >= 400:
            raise JudgeError(f"judge {label}: answered HTTP {response.status_code}")
        payload = json.loads(_read_capped(response, config.max_response_bytes, deadline, label))
    try:
        return str(payload["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge {label}: the reply is not a chat completion") from None


def _read_capped(response: httpx.Response, most: int, deadline: float, url: str) -> bytes:
    """The reply's body (decoded), read as it arrives: an error once it passes ``most`` bytes or the deadline (a
    server that drips its reply never holds the run longer than ``timeout_s``)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > most:
            raise JudgeError(f"judge {url}: the reply is longer than {most} bytes (max_response_bytes)")
        if time.monotonic() > deadline:
            raise JudgeError(f"judge {url}: no whole reply within timeout_s")
        chunks.append(chunk)
    return b"".join(chunks)


JUDGE_FAILURES = (JudgeError, httpx.HTTPError, ValueError, OSError)
"""What one judge request may raise that counts as a failed request (ValueError: a reply that is not JSON)."""


def judge_answers(
    config: JudgeConfig,
    samples: Sequence[GenerativeSample],
    answers: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
    *,
    connect_to: str | None = None,
) -> dict[str, Any]:
    """Rate every answer (``connect_to``: as for :func:`chat_completion`); return ``score`` (mean 0-6),
    ``hallucination_rate`` (share rated < 3), ``rated`` and ``failures`` (requests or replies that gave no rating),
    and ``ratings`` per sample (None where it failed)."""
    if len(samples) != len(answers):
        raise ValueError(f"answers: {len(answers)} answers for {len(samples)} samples")
    ratings: list[int | None] = []
    for index, (sample, answer) in enumerate(zip(samples, answers, strict=True)):
        image = base64.b64encode(sample.image.read_bytes()).decode()
        text = JUDGE_PROMPT.format(objects=", ".join(sample.objects) or "none", question=sample.prompt, answer=answer)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                    {"type": "text", "text": text},
                ],
            }
        ]
        try:
            ratings.append(parse_rating(chat_completion(config, messages, connect_to=connect_to)))
        except JUDGE_FAILURES:
            ratings.append(None)
        if progress is not None:
            progress(index + 1, len(samples))
    rated = [r for r in ratings if r is not None]
    return {
        "score": sum(rated) / len(rated) if rated else None,
        "hallucination_rate": sum(r < 3 for r in rated) / len(rated) if rated else None,
        "rated": len(rated),
        "failures": len(ratings) - len(rated),
        "ratings": ratings,
    }
