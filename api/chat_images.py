"""The images of a chat request, checked before anything is forwarded: data URIs decoded and bounded, remote URLs
fetched by the API itself when the operator allows their host.

The inference backend only ever receives ``data:image/...;base64,...`` URIs, so it never fetches a URL (a backend
on an internal network reaching out for a tenant would be a server-side request forgery). An image is refused with
the part at fault named in ``param`` when its URI is malformed, it does not decode, it is larger than
``DAMA_CHAT_MAX_IMAGE_PIXELS`` decoded, or the request carries more than ``DAMA_CHAT_MAX_IMAGES``.

Remote ``http(s)`` URLs are refused unless their host is on ``DAMA_CHAT_IMAGE_HOSTS``. Then the API resolves the
host once, refuses it unless every address is public (or the host is also on ``DAMA_WEBHOOK_ALLOWED_HOSTS``, the
operator's list of trusted private hosts), connects to the address it checked, follows no redirect, and reads at
most ``DAMA_CHAT_IMAGE_FETCH_BYTES`` within ``DAMA_CHAT_IMAGE_FETCH_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image, UnidentifiedImageError

from api.errors import ApiError
from jobstore.settings import Settings
from jobstore.webhooks import RefusedTarget, parse_allowed_hosts, pinned_address

_MIME = re.compile(r"^image/[A-Za-z0-9.+-]{1,100}$", re.ASCII)
# What Pillow may decode for a tenant: the common raster formats, never its other parsers (EPS, PSD, ...).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class CheckedImage:
    """One image as it is forwarded (a data URI), with its decoded size."""

    data_uri: str
    width: int
    height: int


def _bad(code: str, message: str, param: str) -> ApiError:
    return ApiError(400, code, f"{param}: {message}", param=param)


def check_image_bytes(data: bytes, *, param: str, max_pixels: int) -> tuple[str, int, int]:
    """The image's MIME type and size; 400 unless it decodes as an image of at most ``max_pixels`` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise _bad(
                        "image_too_large",
                        f"the image is {width}x{height} ({width * height} pixels); the most accepted is {max_pixels} "
                        "pixels (DAMA_CHAT_MAX_IMAGE_PIXELS)",
                        param,
                    )
                image.load()  # decode it all: a truncated or corrupt file is refused here, not by the backend
                mime = Image.MIME.get(image.format or "", "")
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as error:
        raise _bad("invalid_image", f"the image does not decode ({type(error).__name__})", param) from None
    if not mime.startswith("image/"):
        raise _bad("invalid_image", "the data is not an image format this service reads", param)
    return mime, width, height


def decode_data_uri(url: str, *, param: str, max_pixels: int) -> CheckedImage:
    """A ``data:image/...;base64,...`` URI checked and re-labelled with the type its bytes really have. The header
    is split, never matched by a backtracking pattern (a crafted URI cannot stall the API)."""
    header, comma, payload = url.partition(",")
    pieces = header[len("data:") :].split(";") if header.startswith("data:") else []
    mime_ok = bool(pieces) and (pieces[0] == "" or _MIME.match(pieces[0]) is not None)
    if not comma or len(pieces) < 2 or pieces[-1] != "base64" or not mime_ok or len(header) > 1000:
        raise _bad(
            "invalid_image_url",
            "not a base64 data URI; send 'data:image/png;base64,...' (or an http(s) URL where the operator allows "
            "its host)",
            param,
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("invalid_image_url", "the data URI's base64 payload is malformed", param) from None
    mime, width, height = check_image_bytes(data, param=param, max_pixels=max_pixels)
    return CheckedImage(f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", width, height)


async def fetch_remote(url: str, *, param: str, settings: Settings) -> CheckedImage:
    """Fetch an ``http(s)`` image URL for the backend (module docstring); 400 with the reason when refused."""
    allowed = parse_allowed_hosts(settings.chat_image_hosts)
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not allowed:
        raise _bad(
            "remote_image_not_allowed",
            "this service does not fetch image URLs (DAMA_CHAT_IMAGE_HOSTS is empty); send the image as a base64 "
            "data URI",
            param,
        )
    if host not in allowed or parts.username is not None or parts.password is not None:
        raise _bad("remote_image_not_allowed", f"the host {host or '(none)'!r} is not on DAMA_CHAT_IMAGE_HOSTS", param)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        async with asyncio.timeout(settings.chat_image_fetch_timeout_s):
            address = await asyncio.to_thread(
                pinned_address,
                host,
                port,
                allowed_hosts=frozenset(settings.allowed_webhook_hosts),
                setting="DAMA_WEBHOOK_ALLOWED_HOSTS",
            )
    except (RefusedTarget, ValueError) as refused:
        raise _bad("remote_image_not_allowed", str(refused), param) from None
    except TimeoutError:
        raise _bad("image_fetch_failed", f"resolving {host} took too long", param) from None
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    limit = settings.chat_image_fetch_bytes
    # No compression: the size cap counts the bytes as sent (a small gzip body cannot inflate past it).
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*", "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    try:
        async with (
            asyncio.timeout(settings.chat_image_fetch_timeout_s),
            httpx.AsyncClient(timeout=settings.chat_image_fetch_timeout_s, follow_redirects=False) as client,
        ):
            request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    raise _bad(
                        "image_fetch_failed",
                        f"fetching the image answered HTTP {response.status_code} (redirects are not followed)",
                        param,
                    )
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body.extend(chunk)
                    if len(body) > limit:
                        raise _bad(
                            "image_too_large",
                            f"the image at the URL is larger than {limit} bytes (DAMA_CHAT_IMAGE_FETCH_BYTES)",
                            param,
                        )
            finally:
                await response.aclose()
    except TimeoutError:
        raise _bad("image_fetch_failed", "fetching the image took too long", param) from None
    except httpx.HTTPError as error:
        raise _bad("image_fetch_failed", f"fetching the image failed ({type(error).__name__})", param) from None
    mime, width, height = await asyncio.to_thread(
        check_image_bytes, bytes(body), param=param, max_pixels=settings.chat_max_image_pixels
    )
    return CheckedImage(f"data:{mime};base64,{base64.b64encode(bytes(body)).decode('ascii')}", width, height)


async def check_image_url(url: str, *, param: str, settings: Settings) -> CheckedImage:
    """Any image URL of a chat request, as the data URI the backend receives. Decoding runs in a worker thread: a
    large image never stalls the API's event loop."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return await asyncio.to_thread(decode_data_uri, url, param=param, max_pixels=settings.chat_max_image_pixels)
    if scheme in ("http", "https"):
        return await fetch_remote(url, param=param, settings=settings)
    raise _bad("invalid_image_url", "an image URL is a base64 data URI or an http(s) URL", param)
