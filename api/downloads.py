"""Serving a stored artifact, whichever backend holds it.

* filesystem store: the file itself (Starlette's ``FileResponse`` answers Range requests);
* S3 store, ``DAMA_DOWNLOAD_MODE=stream``: the object streamed through the API, one ``Range`` (``bytes=a-b``,
  ``bytes=a-``, ``bytes=-n``) passed on to the store and answered 206 with ``Content-Range``;
* S3 store, ``DAMA_DOWNLOAD_MODE=redirect``: 307 to a presigned link signed for ``DAMA_S3_PUBLIC_ENDPOINT_URL``,
  valid ``DAMA_PRESIGN_EXPIRY_S``; the API then moves no artifact bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from api.errors import ApiError
from jobstore.artifacts import ArtifactStore, S3Store

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


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
    """The response that downloads the artifact at ``path`` (the caller checked it exists and is the tenant's)."""
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
