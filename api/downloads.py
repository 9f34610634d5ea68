"""Serving a stored artifact (adapters, checkpoint adapters, merged exports, evaluation outputs), whichever backend
holds it: one module, one response shape for every download route.

* filesystem store: the file itself (Starlette's ``FileResponse`` answers Range requests: 206 with
  ``Content-Range``; several ranges as multipart);
* S3 store, ``DAMA_DOWNLOAD_MODE=stream``: the object streamed through the API, one ``Range`` (``bytes=a-b``,
  ``bytes=a-``, ``bytes=-n``) passed on to the store and answered 206 with ``Content-Range``;
* S3 store, ``DAMA_DOWNLOAD_MODE=redirect``: 307 to a presigned link signed for ``DAMA_S3_PUBLIC_ENDPOINT_URL``,
  valid ``DAMA_PRESIGN_EXPIRY_S``; the API then moves no artifact bytes.

Archives carry the whole file's SHA-256 in ``X-Content-SHA256`` and the RFC 9530 ``Repr-Digest`` header
(:func:`digest_headers`), so a download fetched in parts or resumed can be checked.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from api.errors import ApiError
from jobstore.artifacts import ArtifactStore, S3Store

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def safe_label(text: str | None) -> str:
    """A job's suffix as a file-name part: letters, digits, ``.``, ``_`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") if text else ""


def digest_headers(sha256: str) -> dict[str, str]:
    """The headers naming an archive's SHA-256 (hex, and RFC 9530's base64 form)."""
    digest_b64 = base64.b64encode(bytes.fromhex(sha256)).decode()
    return {"X-Content-SHA256": sha256, "Repr-Digest": f"sha-256=:{digest_b64}:"}


def archive_responses(description: str, media_type: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of an archive download's 200, 206, 307 and 416 answers."""
    headers = {
        "X-Content-SHA256": {"description": "SHA-256 of the whole archive (hex).", "schema": {"type": "string"}},
        "Repr-Digest": {"description": "RFC 9530 digest (sha-256) of the whole archive.", "schema": {"type": "string"}},
        "Accept-Ranges": {"description": "Always `bytes`: Range requests are supported.", "schema": {"type": "string"}},
    }
    content = {media_type: {"schema": {"type": "string", "format": "binary"}}}
    return {
        200: {"description": description, "content": content, "headers": headers},
        206: {"description": "The requested byte range(s) (a `Range` request).", "content": content},
        307: {"description": "With an S3 store and DAMA_DOWNLOAD_MODE=redirect: a presigned link in Location."},
        416: {"description": "The requested range is outside the archive (`Content-Range: bytes */<size>`)."},
    }


def artifact_response(
    store: ArtifactStore,
    path: Path,
    *,
    request: Request,
    media_type: str,
    mode: str,
    filename: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The response that downloads the artifact at ``path`` (the caller checked the store holds it and that it is
    the tenant's; with S3 no local copy is needed)."""
    extra = dict(headers or {})
    if not isinstance(store, S3Store):
        return FileResponse(path, media_type=media_type, filename=filename, headers=extra)
    if mode == "redirect":
        return RedirectResponse(store.presigned_url(path, filename=filename), status_code=307, headers=extra)
    start, end = _requested_range(request.headers.get("range"), store, path)
    part = store.read_range(path, start, end)
    extra.update({"Accept-Ranges": "bytes", "Content-Length": str(part.end - part.start + 1)})
    if filename:
        extra["Content-Disposition"] = f'attachment; filename="{filename}"'
    status = 200
    if start is not None:
        status = 206
        extra["Content-Range"] = f"bytes {part.start}-{part.end}/{part.total}"
    return StreamingResponse(part.chunks, status_code=status, media_type=media_type, headers=extra)


def _requested_range(header: str | None, store: S3Store, path: Path) -> tuple[int | None, int | None]:
    """The first and last byte asked for (None, None: the whole object); 416 for a range the object lacks."""
    if not header:
        return None, None
    match = _RANGE.match(header.strip())
    if match is None or match.groups() == ("", ""):  # several ranges, or another unit: send it whole (RFC 9110)
        return None, None
    size = store.size_bytes(path)
    first, last = match.groups()
    if first == "":  # the last n bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"Range: the file has {size} bytes",
            param="Range",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end
