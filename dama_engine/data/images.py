"""Images in rows: paths relative to the data file (kept inside its folder), base64 and data URIs; remote URLs are
refused, never fetched.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from PIL import Image

from dama_engine.data.readers import RowContext, type_name
from dama_engine.data.rows import ImageSource
from dama_engine.data.validation import ErrorCode

URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
WINDOWS_DRIVE = re.compile(r"^[a-zA-Z]:")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


REMOTE_REASON = "remote image URLs are not fetched; embed the image (base64 or a data URI) or ship the file"


def _decode_base64(text: str, path: str, context: RowContext) -> ImageSource | None:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        context.problem(path, ErrorCode.BAD_VALUE, "not valid base64")
        return None
    if not data:
        context.problem(path, ErrorCode.BAD_VALUE, "empty image data")
        return None
    return ImageSource(data=data)


def decode_data_uri(uri: str, path: str, context: RowContext) -> ImageSource | None:
    header, separator, payload = uri.partition(",")
    if not separator or ";base64" not in header.lower():
        context.problem(path, ErrorCode.BAD_VALUE, "only base64 data URIs are supported (data:image/png;base64,...)")
        return None
    media_type = header[5:].split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        context.problem(path, ErrorCode.BAD_VALUE, f"data URI of type {media_type!r}, not an image")
        return None
    return _decode_base64(payload, path, context)


def image_reference(value: Any, path: str, context: RowContext) -> ImageSource | None:
    """An image given as bytes, a ``{"bytes", "path"}`` dict, base64, a data URI or a relative path."""
    if isinstance(value, bytes | bytearray | memoryview):
        return ImageSource(data=bytes(value))
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, bytes | bytearray):
            return ImageSource(data=bytes(data))
        if isinstance(data, str):
            return _decode_base64(data, f"{path}.bytes", context)
        if data is not None:
            context.problem(f"{path}.bytes", ErrorCode.WRONG_TYPE, f"expected bytes or base64, got {type_name(data)}")
            return None
        file = value.get("path")
        if isinstance(file, str) and file:
            return image_string(file, f"{path}.path", context, allow_base64=False)
        context.problem(path, ErrorCode.MISSING_FIELD, "an image object needs 'bytes' or 'path'")
        return None
    if isinstance(value, str):
        return image_string(value, path, context)
    expected = "a path, base64, a data URI or a {'bytes', 'path'} object"
    context.problem(path, ErrorCode.WRONG_TYPE, f"expected {expected}, got {type_name(value)}")
    return None


def image_string(text: str, path: str, context: RowContext, *, allow_base64: bool = True) -> ImageSource | None:
    text = text.strip()
    head = text[:16].lower()
    if head.startswith(("http://", "https://")):
        context.problem(path, ErrorCode.REMOTE_IMAGE, REMOTE_REASON)
        return None
    if head.startswith("data:"):
        return decode_data_uri(text, path, context)
    if URL_SCHEME.match(text):
        context.problem(path, ErrorCode.REMOTE_IMAGE, f"URLs are not read ({text.split(':', 1)[0]}://); ship the file")
        return None
    # Base64 has no '.', and even a 1x1 PNG takes ~90 characters; a path that happens to decode is still a path.
    looks_base64 = allow_base64 and len(text) >= 64 and "." not in text and _BASE64.fullmatch(text) is not None
    if looks_base64 and not context.base_dir.joinpath(text).exists():
        return _decode_base64(text, path, context)
    return _image_file(text, path, context)


def _image_file(relative: str, path: str, context: RowContext) -> ImageSource | None:
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or WINDOWS_DRIVE.match(relative):
        context.problem(path, ErrorCode.BAD_VALUE, f"image path {relative!r} must be relative to the data file")
        return None
    if ".." in pure.parts:
        context.problem(path, ErrorCode.BAD_VALUE, f"image path {relative!r} must stay inside the data file's folder")
        return None
    full = context.base_dir.joinpath(*pure.parts)
    if not full.is_file():
        reason = f"image file not found: {relative!r} (paths are relative to the data file's folder)"
        context.problem(path, ErrorCode.IMAGE_NOT_FOUND, reason)
        return None
    return ImageSource(path=full)


@dataclass(frozen=True)
class PixelBudget:
    """Bounds on an image's size (``data.max_pixels``, ``data.min_pixels``, ``data.max_image_side``; None: no bound).

    :meth:`fit` resizes an image into them, aspect ratio kept, before any processor sees it: a large image costs
    fewer image tokens (Qwen2-VL) or less decoding work, and is never trained on with some of its tokens cut.
    """

    max_pixels: int | None = None
    min_pixels: int | None = None
    max_side: int | None = None

    @property
    def is_set(self) -> bool:
        return any(bound is not None for bound in (self.max_pixels, self.min_pixels, self.max_side))

    def scale(self, width: int, height: int) -> float:
        """The factor that brings a ``width`` x ``height`` image into the budget (1.0: it already fits)."""
        scale = 1.0
        area = width * height
        if self.max_pixels is not None and area > self.max_pixels:
            scale = math.sqrt(self.max_pixels / area)
        elif self.min_pixels is not None and area < self.min_pixels:
            scale = math.sqrt(self.min_pixels / area)
        if self.max_side is not None and max(width, height) * scale > self.max_side:
            scale = self.max_side / max(width, height)
        return scale

    def fit(self, image: Image.Image) -> Image.Image:
        scale = self.scale(*image.size)
        if scale == 1.0:
            return image
        # Floor when shrinking (the area stays within max_pixels), ceil when growing (at least min_pixels).
        rounding = math.floor if scale < 1 else math.ceil
        size = (max(1, rounding(image.width * scale)), max(1, rounding(image.height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)
