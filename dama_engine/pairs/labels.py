"""Objects for images that come without them: a judge model lists what it sees, the names are matched onto the
vocabulary.

A **prompt set** is a generative set without ``objects`` (``image``, ``prompt``, its ``vocabulary.json``). Before a
pair generation samples such a set, every distinct image is sent once to the judge (any OpenAI-compatible chat
endpoint, :class:`ObjectJudgeConfig`) with the judge's prompt; the reply is split into names
(:func:`parse_object_list`) and each name is matched onto the vocabulary's entries, synonyms and plurals by the
CHAIR matcher (:func:`match_names`): "two red circles" is ``red circle``; a name with no vocabulary entry in it
("sky") is dropped and counted. The matched names become the image's objects, against which the samples are then
judged exactly as a labelled set's are. An image whose request failed (unreachable, an error status, a redirect,
a reply too long or too slow: :data:`~dama_engine.evaluation.judge.JUDGE_FAILURES`) has no objects: its prompts are
skipped and counted.

The client is :func:`dama_engine.evaluation.judge.chat_completion`: no redirects, capped reply size and time, and
an address pinned by the caller (the service checks the judge's address against its policy first).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import Field

from dama_engine.data import GenerativeSample, Vocabulary, normalize_name
from dama_engine.evaluation import JUDGE_FAILURES, JudgeConfig, chat_completion

LIST_PROMPT = (
    "List every object you can see in this image. Reply with the objects' short names separated by commas "
    "(for example: red circle, blue square), nothing else."
)
MOST_COMMON_UNMATCHED = 10

# Pieces of a reply: lines, commas, semicolons and the word "and" separate names.
_SEPARATORS = re.compile(r"[\n,;]|\band\b", re.IGNORECASE)
# A list marker at the start of a piece: "-", "*", "•", "1.", "2)".
_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


class ObjectJudgeConfig(JudgeConfig):
    """The judge that lists the objects of unlabelled images (``prompt``: what it is asked beside the image)."""

    prompt: str = Field(default=LIST_PROMPT, min_length=1, description="The text sent with each image.")
    max_tokens: int = Field(default=128, gt=0, description="Most tokens of the judge's reply.")
    concurrency: int = Field(default=4, gt=0, le=64, description="Requests in flight at once.")


@dataclass(frozen=True)
class ImageObjects:
    """What the judge made of one image: the matched objects, the names it gave that match nothing, its reply,
    and the error when the request failed (then ``objects`` is empty and the image's prompts are skipped)."""

    objects: tuple[str, ...]
    unmatched: tuple[str, ...]
    reply: str
    error: str | None = None


def parse_object_list(reply: str) -> list[str]:
    """The names in a judge's reply, in order: split at lines, commas, semicolons and "and"; list markers and
    trailing punctuation removed; empty pieces dropped."""
    names = []
    for piece in _SEPARATORS.split(reply):
        name = _MARKER.sub("", piece).strip().strip(".:!?\"'`*").strip()
        if name:
            names.append(name)
    return names


def match_names(names: Sequence[str], vocabulary: Vocabulary) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(objects, unmatched)``: the vocabulary objects the names mention (distinct, in order; a name may mention
    several) and the names that mention none (normalized)."""
    objects: list[str] = []
    unmatched: list[str] = []
    for name in names:
        mentioned = vocabulary.mentioned(name)
        if mentioned:
            objects += mentioned
        else:
            unmatched.append(normalize_name(name))
    return tuple(dict.fromkeys(objects)), tuple(unmatched)


def failure_text(error: BaseException, config: JudgeConfig) -> str:
    """What a failed request reports (it reaches the run's report and error): the error without the judge's key,
    and only its kind for a request the HTTP library refused to send (its message quotes the headers)."""
    if isinstance(error, httpx.LocalProtocolError):
        return f"{type(error).__name__}: the HTTP client refused to send the request (a malformed header?)"
    text = f"{type(error).__name__}: {error}"
    if config.api_key:
        text = text.replace(config.api_key, "[api key]")
    return text


def _image_part(data: bytes) -> dict[str, Any]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        kind = (image.format or "png").lower()
    encoded = base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{encoded}"}}


def list_objects(
    config: ObjectJudgeConfig, data: bytes, vocabulary: Vocabulary, *, connect_to: str | None = None
) -> ImageObjects:
    """Ask the judge what one image (its file's bytes) shows and match the reply onto ``vocabulary``."""
    try:  # an image PIL cannot open counts as a failed image too (OSError)
        messages = [{"role": "user", "content": [_image_part(data), {"type": "text", "text": config.prompt}]}]
        reply = chat_completion(config, messages, connect_to=connect_to)
    except JUDGE_FAILURES as error:
        return ImageObjects((), (), "", error=failure_text(error, config))
    objects, unmatched = match_names(parse_object_list(reply), vocabulary)
    return ImageObjects(objects, unmatched, reply)


def group_by_image(prompts: Sequence[GenerativeSample]) -> dict[str, list[GenerativeSample]]:
    """The prompts grouped by their image's content (sha256 of its file's bytes), so each image is asked once."""
    groups: dict[str, list[GenerativeSample]] = {}
    for prompt in prompts:
        groups.setdefault(hashlib.sha256(prompt.image.read_bytes()).hexdigest(), []).append(prompt)
    return groups


def label_prompts(
    config: ObjectJudgeConfig,
    groups: dict[str, list[GenerativeSample]],
    vocabulary: Vocabulary,
    *,
    connect_to: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, ImageObjects] | None:
    """The judge's objects for every prompt of :func:`group_by_image`'s ``groups`` (by ``sample_id``): one request
    per image, ``config.concurrency`` at a time; ``progress(images done, images)`` after each. None when
    ``should_stop()`` said so (polled after each image; requests not yet sent are dropped)."""

    def ask(group: list[GenerativeSample]) -> ImageObjects:
        return list_objects(config, group[0].image.read_bytes(), vocabulary, connect_to=connect_to)

    found: dict[str, ImageObjects] = {}
    pool = ThreadPoolExecutor(max_workers=config.concurrency)
    try:
        futures = [(group, pool.submit(ask, group)) for group in groups.values()]
        for done, (group, future) in enumerate(futures, start=1):
            if should_stop is not None and should_stop():
                return None
            result = future.result()
            for prompt in group:
                found[prompt.sample_id] = result
            if progress is not None:
                progress(done, len(futures))  # the worker's reporter may raise here (a cancel, a shutdown)
    finally:
        # However the loop ends (done, a stop, a cancel raised by progress, an error): no request not yet sent
        # is sent; those in flight end within the judge's timeout in their own threads.
        pool.shutdown(wait=False, cancel_futures=True)
    return found


def labels_report(found: dict[str, ImageObjects], *, model: str, name: str | None = None) -> dict[str, Any]:
    """The judge's part of a pair generation's report: images asked and failed (with the first error), names
    given, matched and dropped, the most commonly dropped names, and objects per image."""
    images = list({id(result): result for result in found.values()}.values())  # each distinct image once
    answered = [result for result in images if result.error is None]
    unmatched = Counter(name for result in answered for name in set(result.unmatched))
    errors = [result.error for result in images if result.error is not None]
    matched_objects = sum(len(result.objects) for result in answered)
    return {
        "name": name,
        "model": model,
        "images": len(images),
        "failed_images": len(errors),
        "first_error": errors[0] if errors else None,
        "prompts_skipped": sum(1 for result in found.values() if result.error is not None),
        "objects_matched": matched_objects,
        "names_unmatched": sum(len(result.unmatched) for result in answered),
        "most_common_unmatched": [
            {"name": name, "images": count}
            for name, count in sorted(unmatched.items(), key=lambda item: (-item[1], item[0]))[:MOST_COMMON_UNMATCHED]
        ],
        "objects_per_image": round(matched_objects / len(answered), 3) if answered else None,
        "images_without_objects": sum(1 for result in answered if not result.objects),
    }
