"""The OpenAI Chat Completions protocol: a request body checked and turned into the engine's request and decoding
settings, and the bodies of the answers (a completion, a stream's chunks, an error) in OpenAI's shape.

No HTTP here: the server (``worker.infer``) answers a :class:`ChatError` with its ``status`` and writes these
bodies. The rules:

* parameters: ``model``, ``messages``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (default 1.0,
  as OpenAI's; 0: greedy), ``top_p``, ``seed``, ``stop`` (a string or up to 4), ``stream`` and
  ``stream_options.include_usage``; ``null`` is the default. Any other parameter is refused
  (``unsupported_parameter``, naming it).
* messages: roles ``system``, ``user`` and ``assistant``; content a string or a list of parts, ``text`` and (in a
  user message) ``image_url`` with a base64 ``data:`` URI only (the API fetches remote images itself).
* a message becomes the chat-template form of :class:`~dama_engine.forward.GenerationRequest`: each image part a
  ``{"type": "image"}`` in place (its decoded image appended to ``images``), each text part a text part, string
  content one text part. A user message of an image and a text renders exactly as
  ``GenerationRequest.from_prompt(text, [image])``, so the endpoint reproduces an evaluation's greedy answers.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from dama_engine.forward import GenerationRequest

PARAMETERS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
    }
)
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name"})
MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)$", re.DOTALL)
# The raster formats a tenant's image may be in: Pillow's other parsers (EPS, PSD, ...) never see tenant bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/])/(?:[\w.@+-]+/)+[\w.@+-]*")


class ChatError(Exception):
    """A request the backend refuses or could not answer, as OpenAI reports it: ``{"error": {...}}`` with an HTTP
    status. The message never names a server path (:func:`public_message`)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str | None = "invalid_value",
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = public_message(message)
        self.status = status
        self.code = code
        self.param = param
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def public_message(text: str) -> str:
    """``text`` with every absolute filesystem path replaced by ``<path>`` (errors go to remote clients)."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def server_error(message: str = "The server could not generate an answer.") -> ChatError:
    return ChatError(message, status=500, code="server_error", kind="server_error")


def model_not_found(model: str) -> ChatError:
    return ChatError(
        f"The model '{model}' does not exist or is not available.", status=404, code="model_not_found", param="model"
    )


@dataclass(frozen=True)
class ChatLimits:
    """What one request may ask for (the API checks the same settings before forwarding)."""

    max_tokens: int = 1024  # the most tokens an answer may ask for, and the default
    max_images: int = 4
    max_image_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class RowSettings:
    """How one row is decoded: its own length limit, sampling and stop strings."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling: the row's own RNG is seeded with it (repeatable, batch-independent)
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat completion request."""

    model: str
    generation: GenerationRequest
    settings: RowSettings
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: Any, limits: ChatLimits) -> ChatRequest:
    """Check a request body (parsed JSON) and convert it; raises :class:`ChatError` (400) on the first problem."""
    if not isinstance(body, dict):
        raise ChatError("The request body must be a JSON object.", code="invalid_request_body")
    for name in sorted(body):
        if name not in PARAMETERS:
            raise ChatError(f"Unsupported parameter: '{name}'.", code="unsupported_parameter", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ChatError("'model' must be a non-empty string.", param="model")
    stream = _optional(body, "stream", bool, False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ChatError("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ChatError("'stream_options' may only hold 'include_usage'.", param="stream_options")
        include_usage = _optional(options, "include_usage", bool, False, where="stream_options.")
    settings = RowSettings(
        max_tokens=_max_tokens(body, limits),
        temperature=_number(body, "temperature", 1.0, low=0.0, high=MAX_TEMPERATURE, low_open=False),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        seed=_optional(body, "seed", int, None),
        stop=_stop(body.get("stop")),
    )
    generation = chat_generation_request(body.get("messages"), limits)
    return ChatRequest(model, generation, settings, stream=stream, include_usage=include_usage)


def _optional(values: dict[str, Any], name: str, kind: type, default: Any, *, where: str = "") -> Any:
    value = values.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ChatError(f"'{where}{name}' must be {'a boolean' if kind is bool else 'an integer'}.", param=where + name)
    return value


def _number(body: dict[str, Any], name: str, default: float, *, low: float, high: float, low_open: bool) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ChatError(f"'{name}' must be a number.", param=name)
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise ChatError(f"'{name}' must be {bounds}, got {value}.", param=name)
    return float(value)


def _max_tokens(body: dict[str, Any], limits: ChatLimits) -> int:
    given = {
        name: _optional(body, name, int, None)
        for name in ("max_tokens", "max_completion_tokens")
        if body.get(name) is not None
    }
    if len(set(given.values())) > 1:
        raise ChatError("'max_tokens' and 'max_completion_tokens' disagree; send one.", param="max_completion_tokens")
    if not given:
        return limits.max_tokens
    name, value = next(iter(given.items()))
    if not 1 <= value <= limits.max_tokens:
        raise ChatError(f"'{name}' must be between 1 and {limits.max_tokens}, got {value}.", param=name)
    return int(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_STRINGS
        or not all(isinstance(stop, str) and stop for stop in stops)
    ):
        message = f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them."
        raise ChatError(message, param="stop")
    return tuple(stops)


def chat_generation_request(messages: Any, limits: ChatLimits) -> GenerationRequest:
    """OpenAI ``messages`` -> the engine's request (module docstring); raises :class:`ChatError`."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list of messages.", param="messages")
    chat: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ChatError(f"'{where}' must be an object with 'role' and 'content'.", param=where)
        for key in sorted(message):
            if key not in MESSAGE_KEYS:
                raise ChatError(f"Unsupported parameter: '{where}.{key}'.", code="unsupported_parameter", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"'{where}.role' must be one of {', '.join(ROLES)}.", param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = [_part(part, f"{where}.content[{i}]", role, images, limits) for i, part in enumerate(content)]
        else:
            raise ChatError(f"'{where}.content' must be a string or a non-empty list of parts.", param=where)
        chat.append({"role": role, "content": parts})
    if len(images) > limits.max_images:
        raise ChatError(f"At most {limits.max_images} images per request, got {len(images)}.", param="messages")
    return GenerationRequest(messages=tuple(chat), images=tuple(images))


def _part(part: Any, where: str, role: str, images: list[Image.Image], limits: ChatLimits) -> dict[str, str]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatError(f"'{where}.text' must be a string.", param=f"{where}.text")
        return {"type": "text", "text": text}
    if kind == "image_url":
        if role != "user":
            raise ChatError(f"'{where}': images are only allowed in user messages.", param=where)
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if not isinstance(url, str):
            raise ChatError(f"'{where}.image_url.url' must be a string.", param=f"{where}.image_url")
        images.append(decode_data_uri(url, f"{where}.image_url", limits.max_image_pixels))
        return {"type": "image"}
    raise ChatError(f"'{where}' must be a part of type 'text' or 'image_url'.", param=where)


def decode_data_uri(url: str, param: str, max_pixels: int) -> Image.Image:
    """An image ``data:`` URI -> an RGB image, decoded as the engine decodes dataset images
    (:meth:`dama_engine.data.ImageSource.load`). 400 ``invalid_image_url`` for anything but a base64 data URI,
    ``invalid_image`` for bytes that are no image or one above ``max_pixels``."""
    if url.startswith(("http://", "https://")):
        raise ChatError(
            "Remote image URLs are not fetched here; send the image inline as a base64 data URI.",
            code="invalid_image_url",
            param=param,
        )
    match = _DATA_URI.match(url)
    if match is None or ";base64" not in match["params"] or not (match["mime"] or "").startswith("image/"):
        raise ChatError(
            "An image URL must be a base64 data URI of an image (data:image/...;base64,...).",
            code="invalid_image_url",
            param=param,
        )
    try:
        data = base64.b64decode(match["data"], validate=True)
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ChatError(
                    f"The image is {width}x{height}: above {max_pixels} pixels.", code="invalid_image", param=param
                )
            return image.convert("RGB")
    except ChatError:
        raise
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as error:
        raise ChatError(
            f"The image could not be decoded ({type(error).__name__}).", code="invalid_image", param=param
        ) from None


@dataclass(frozen=True)
class ChatAnswer:
    """One row's finished answer."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int  # the row's own prompt tokens (no padding)
    completion_tokens: int  # the tokens generated for it (an EOS that ended it included)


@dataclass(frozen=True)
class ChatResponder:
    """The bodies of one request's answer: a ``chat.completion`` or the ``chat.completion.chunk`` events."""

    completion_id: str
    created: int
    model: str
    include_usage: bool = False

    def completion(self, answer: ChatAnswer) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": usage(answer),
        }

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            body["usage"] = None  # as OpenAI: present on every chunk, filled on the last one only
        return body

    def usage_chunk(self, answer: ChatAnswer) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(answer),
        }


def usage(answer: ChatAnswer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }
