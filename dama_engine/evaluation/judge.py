"""An optional LLM judge for generative answers (MMHal-Bench style), through any OpenAI-compatible chat endpoint.

Off by default and never needed by the tests of the rest of the engine. For each sample the judge sees the image
(as a data URI), the question, the objects that are truly in the image, and the model's answer, and rates it
0-6 as MMHal-Bench does (6: informative, no hallucination ... 0: not informative and hallucinated); a rating
below 3 counts as a hallucination. Plain ``urllib``: the engine takes no HTTP client dependency for this. The
client follows no redirect and reads no reply longer than ``max_response_bytes`` or slower than ``timeout_s``:
each such request counts as a failure.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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
    api_key: str | None = Field(default=None, description="Bearer key; the CLI takes DAMA_JUDGE_API_KEY when unset.")
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


def _chat(config: JudgeConfig, messages: list[dict[str, Any]]) -> str:
    body = json.dumps(
        {"model": config.model, "messages": messages, "temperature": 0, "max_tokens": config.max_tokens}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(
        config.url.rstrip("/") + "/chat/completions", data=body, headers=headers, method="POST"
    )
    deadline = time.monotonic() + config.timeout_s
    with _NO_REDIRECTS.open(request, timeout=config.timeout_s) as response:
        payload = json.loads(_read_capped(response, config.max_response_bytes, deadline, config.url))
    return str(payload["choices"][0]["message"]["content"])


class JudgeError(RuntimeError):
    """The judge endpoint answered in a way the judge does not follow (a redirect, a reply too long or too slow)."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        fp.close()  # the redirect's own connection, not kept until garbage collection
        raise JudgeError(f"judge {req.full_url}: answered {code} (a redirect to {newurl}); redirects are not followed")


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def _read_capped(response: Any, most: int, deadline: float, url: str) -> bytes:
    """The reply's body, read in chunks: an error once it passes ``most`` bytes or the deadline (a server that
    drips its reply never holds the evaluation longer than ``timeout_s``)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read1(65536):  # what has arrived, so a slow reply is noticed between its chunks
        size += len(chunk)
        if size > most:
            raise JudgeError(f"judge {url}: the reply is longer than {most} bytes (max_response_bytes)")
        if time.monotonic() > deadline:
            raise JudgeError(f"judge {url}: no whole reply within timeout_s")
        chunks.append(chunk)
    return b"".join(chunks)


def judge_answers(
    config: JudgeConfig,
    samples: Sequence[GenerativeSample],
    answers: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Rate every answer; return ``score`` (mean 0-6), ``hallucination_rate`` (share rated < 3), ``rated`` and
    ``failures`` (requests or replies that gave no rating), and ``ratings`` per sample (None where it failed)."""
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
            ratings.append(parse_rating(_chat(config, messages)))
        except (JudgeError, urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError, OSError):
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
