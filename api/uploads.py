"""Receive a ``multipart/form-data`` dataset upload straight to disk.

The request body is parsed as it arrives (python-multipart's push parser) and the ``file`` part is written chunk by
chunk into ``uploads/tmp-<random>/upload<suffix>``, hashed and counted on the way: the upload is never held in
memory (nor spooled to a second temporary file first), and one larger than the limit is refused as soon as it
passes it, with the partial file removed.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio.to_thread
from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError
from dama_settings.names import ARCHIVE_SUFFIXES, DATA_FILE_SUFFIXES

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 16
MAX_PART_HEADER_BYTES = 8 * 1024
# Multipart framing (boundaries, part headers, small fields) on top of the file itself.
_ENVELOPE_BYTES = 256 * 1024
# Longest first, so "x.tar.gz" keeps ".tar.gz" (and ".jsonl" is tried before ".json").
KNOWN_SUFFIXES = ARCHIVE_SUFFIXES + DATA_FILE_SUFFIXES


@dataclass
class ReceivedUpload:
    """An upload on disk in its own temporary folder (the caller moves or removes the folder)."""

    folder: Path
    path: Path
    filename: str
    suffix: str
    size_bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def is_data_file(self) -> bool:
        """A bare .jsonl / .json / .parquet file (otherwise: an archive, told apart by content)."""
        return self.suffix in DATA_FILE_SUFFIXES

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def upload_suffix(filename: str) -> str:
    lowered = filename.lower()
    return next((suffix for suffix in KNOWN_SUFFIXES if lowered.endswith(suffix)), ".bin")


def too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413,
        "upload_too_large",
        f"the upload is larger than this service accepts ({max_bytes} bytes; DAMA_MAX_UPLOAD_BYTES)",
        param=FILE_FIELD,
    )


class _FormReceiver:
    """python-multipart callbacks: collect small fields, queue file bytes for the async writer."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.path: Path | None = None
        self.handle: IO[bytes] | None = None
        self.pending: list[bytes] = []
        self.finished = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._part_name: str | None = None
        self._part_is_file = False
        self._field_value = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._part_name = None
        self._part_is_file = False
        self._field_value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        self._check_header()

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._check_header()

    def _check_header(self) -> None:
        if len(self._header_name) + len(self._header_value) > MAX_PART_HEADER_BYTES:
            raise ApiError(400, "malformed_multipart", "a form part's header is too long")

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise ApiError(400, "malformed_multipart", "a form part has no name (Content-Disposition: form-data)")
        self._part_name = name.decode("utf-8", "replace")
        if b"filename" not in options:
            return
        if self._part_name != FILE_FIELD:
            raise ApiError(
                422, "unexpected_file", f"only one file is accepted, in the form field {FILE_FIELD!r}", param=FILE_FIELD
            )
        if self.handle is not None:
            raise ApiError(422, "too_many_files", "send one file per upload", param=FILE_FIELD)
        self.filename = Path(options[b"filename"].decode("utf-8", "replace").replace("\\", "/")).name or "upload"
        self.path = self.folder / f"upload{upload_suffix(self.filename)}"
        self.handle = self.path.open("wb")
        self._part_is_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_is_file:
            self.pending.append(bytes(data[start:end]))
            return
        self._field_value += data[start:end]
        if len(self._field_value) > MAX_FIELD_BYTES:
            raise ApiError(422, "field_too_long", f"form field {self._part_name!r} is too long", param=self._part_name)

    def on_part_end(self) -> None:
        if not self._part_is_file and self._part_name is not None:
            if len(self.fields) >= MAX_FIELDS:
                raise ApiError(422, "too_many_fields", f"send the file and at most {MAX_FIELDS} form fields")
            self.fields[self._part_name] = self._field_value.decode("utf-8", "replace")
        self._part_is_file = False

    def on_end(self) -> None:
        self.finished = True


async def receive_upload(request: Request, *, uploads_dir: Path, max_bytes: int) -> ReceivedUpload:
    """Stream the request's multipart body into a new folder under ``uploads_dir``; raise :class:`ApiError`
    (413 over ``max_bytes``, 415 not multipart, 400/422 malformed) with the folder removed."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(
            415, "unsupported_media_type", "send the dataset as multipart/form-data with the file in the 'file' field"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _ENVELOPE_BYTES:
        raise too_large(max_bytes)  # refused before reading a byte

    folder = uploads_dir / f"tmp-{secrets.token_hex(8)}"
    folder.mkdir(parents=True)
    receiver = _FormReceiver(folder)
    digest = hashlib.sha256()
    size = 0
    try:
        parser = MultipartParser(params[b"boundary"], receiver.callbacks())  # type: ignore[arg-type]
        received = 0
        async for chunk in request.stream():
            # Every byte counts, fields and part headers too: a chunked body cannot grow memory past the limit.
            received += len(chunk)
            if received > max_bytes + _ENVELOPE_BYTES:
                raise too_large(max_bytes)
            try:
                parser.write(chunk)
            except MultipartParseError as error:
                raise ApiError(400, "malformed_multipart", f"the multipart body is malformed: {error}") from error
            if receiver.pending:
                block = b"".join(receiver.pending)
                receiver.pending.clear()
                size += len(block)
                if size > max_bytes:
                    raise too_large(max_bytes)
                digest.update(block)
                assert receiver.handle is not None
                await anyio.to_thread.run_sync(receiver.handle.write, block)
        if not receiver.finished:
            raise ApiError(400, "malformed_multipart", "the multipart body ended early (no closing boundary)")
        if receiver.handle is None or receiver.path is None or receiver.filename is None:
            raise ApiError(422, "missing_file", f"no file in the form field {FILE_FIELD!r}", param=FILE_FIELD)
        if size == 0:
            raise ApiError(422, "empty_file", "the uploaded file is empty", param=FILE_FIELD)
        receiver.handle.close()
    except BaseException:
        if receiver.handle is not None:
            receiver.handle.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return ReceivedUpload(
        folder=folder,
        path=receiver.path,
        filename=receiver.filename,
        suffix=upload_suffix(receiver.filename),
        size_bytes=size,
        sha256=digest.hexdigest(),
        fields=receiver.fields,
    )
