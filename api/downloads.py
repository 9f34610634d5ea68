"""Serving stored archives (adapters, checkpoint adapters, merged exports): one response shape for all.

Starlette's ``FileResponse`` answers ``Range`` requests (206 with ``Content-Range``; several ranges as
multipart), so a large merged model can be fetched in parts or resumed; the whole file's SHA-256 travels in
``X-Content-SHA256`` and the RFC 9530 ``Repr-Digest`` header.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from fastapi.responses import FileResponse


def safe_label(text: str | None) -> str:
    """A job's suffix as a file-name part: letters, digits, ``.``, ``_`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") if text else ""


def archive_response(path: Path, *, sha256: str, filename: str, media_type: str) -> FileResponse:
    digest_b64 = base64.b64encode(bytes.fromhex(sha256)).decode()
    return FileResponse(
        path,
        media_type=media_type,
        filename=filename,
        headers={"X-Content-SHA256": sha256, "Repr-Digest": f"sha-256=:{digest_b64}:"},
    )


def archive_responses(description: str, media_type: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of a download's 200 and 206 answers."""
    headers = {
        "X-Content-SHA256": {"description": "SHA-256 of the whole archive (hex).", "schema": {"type": "string"}},
        "Repr-Digest": {"description": "RFC 9530 digest (sha-256) of the whole archive.", "schema": {"type": "string"}},
        "Accept-Ranges": {"description": "Always `bytes`: Range requests are supported.", "schema": {"type": "string"}},
    }
    content = {media_type: {"schema": {"type": "string", "format": "binary"}}}
    return {
        200: {"description": description, "content": content, "headers": headers},
        206: {"description": "The requested byte range(s) (a `Range` request).", "content": content},
        416: {"description": "The requested range is outside the archive (`Content-Range: bytes */<size>`)."},
    }
