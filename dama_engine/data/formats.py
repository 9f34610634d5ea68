"""Dataset files, folders and archives -> canonical :class:`PreferenceRow` (ARCHITECTURE.md, data flow step 1).

Formats (the ``format=`` names; ``auto`` tells them apart by the first row's columns):

- ``trl``: TRL/HF conversational preference. ``prompt`` is a list of ``{role, content}`` messages (content a string
  or ``{"type": "text"|"image"}`` parts) or a plain string; ``chosen`` / ``rejected`` are a string or a list with
  one assistant message; ``images`` lists paths, ``{"bytes", "path"}`` dicts (as HF datasets stores them) or base64.
  Images without placeholders in the prompt get them at the start of the first user message, as TRL does.
  TRL's prompt/completion form (``completion`` in place of ``chosen`` / ``rejected``) gives rows that carry only an
  answer (``PreferenceRow.answer_only``): ``method: sft`` trains on them; the preference methods refuse them.
- ``rlaif_v``: RLAIF-V columns (shared/DAMA.md section 6): ``question``, ``chosen``, ``rejected``, ``image`` (bytes
  dict or base64) or ``image_path``; ``idx`` becomes the row id; ``ds_name``, ``origin_*`` are kept in ``meta``.
- ``openai``: OpenAI preference JSONL: ``input.messages``, ``preferred_output``, ``non_preferred_output``, images as
  ``image_url`` data URIs.

Every format may carry ``id``, ``chosen_score``, ``rejected_score`` and ``hardness``; other columns go to ``meta``.

A dataset is a data file (.jsonl, .json, .parquet), a folder holding one data file plus images, or a .zip / .tar /
.tar.gz archive of such a folder (unpacked with checks on paths, links, member count and size). Image paths are
relative to the data file and must stay inside its folder. Nothing is fetched from the network.

A problem in one row becomes a :class:`RowError` in the report and the row is left out; a problem with the dataset as
a whole (unknown format, unsafe archive, no data file, unreadable JSON document) raises :class:`DataFormatError`.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import gzip
import json
import lzma
import math
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from dama_engine.data.lines import DataFormatError, DataLimitError, check_file_size, iter_lines
from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, Role, TextPart
from dama_engine.data.validation import (
    SOURCE_FIELDS_META_KEY,
    DataLimits,
    ErrorCode,
    LengthFn,
    ReportBuilder,
    ValidationReport,
    validate_rows,
)
from dama_settings.names import DATA_FILE_SUFFIXES

FORMATS: dict[str, str] = {
    "trl": "TRL/HF conversational preference: prompt, chosen, rejected, images (or prompt, completion: sft only)",
    "rlaif_v": "RLAIF-V: question, chosen, rejected, image or image_path (ds_name, idx, ... optional)",
    "openai": "OpenAI preference JSONL: input.messages, preferred_output, non_preferred_output (images as data URIs)",
}
DATA_SUFFIXES = DATA_FILE_SUFFIXES  # the API accepts the same (dama_settings.names)

_ROLES = ("system", "user", "assistant")
_OPTIONAL_FLOATS = ("chosen_score", "rejected_score", "hardness")
_TRL_PARTS = ("text", "image")
_OPENAI_PARTS = ("text", "input_text", "image_url", "input_image")
_ANSWER_PARTS = ("text", "input_text", "output_text")
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DRIVE = re.compile(r"^[a-zA-Z]:")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_COPY_CHUNK = 1 << 20


@dataclass
class LoadedDataset:
    """Rows read from a dataset, the report of what was wrong, and the folder an archive was unpacked into.

    When :func:`load_dataset` unpacked an archive into a temporary folder (no ``extract_dir`` given), the rows' image
    paths point into ``extracted_dir``; :meth:`close` (or leaving a ``with`` block) removes it.
    """

    rows: list[PreferenceRow]
    format: str
    report: ValidationReport
    data_file: Path
    extracted_dir: Path | None = None

    def close(self) -> None:
        if self.extracted_dir is not None:
            shutil.rmtree(self.extracted_dir, ignore_errors=True)
            self.extracted_dir = None

    def __enter__(self) -> LoadedDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_dataset(
    path: str | Path,
    *,
    format: str = "auto",
    limits: DataLimits | None = None,
    extract_dir: str | Path | None = None,
) -> LoadedDataset:
    """Read a data file, a folder or an archive into canonical rows.

    The report holds parse and conversion errors only (malformed JSON, missing fields, wrong types, unreadable image
    references); :func:`load_and_validate` adds the content checks. An archive is unpacked into ``extract_dir``
    (created if missing, must be empty), else into a temporary folder the result owns.
    """
    if format != "auto" and format not in FORMATS:
        raise DataFormatError(f"unknown format {format!r}; accepted: auto, {', '.join(FORMATS)}")
    limits = limits or DataLimits()
    if _URL_SCHEME.match(str(path)):
        raise DataFormatError(f"{path}: datasets are read from local files only; download it first")
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path} does not exist")
    owned: Path | None = None
    try:
        if path.is_dir():
            data_file = find_data_file(path)
        elif path.suffix.lower() in DATA_SUFFIXES:
            data_file = path
        elif archive_kind(path) is not None:
            if extract_dir is None:
                target = owned = Path(tempfile.mkdtemp(prefix="dama-dataset-"))
            else:
                target = Path(extract_dir)
            extract_archive(path, target, limits=limits)
            data_file = find_data_file(target)
        else:
            raise DataFormatError(
                f"{path.name}: not a data file ({', '.join(DATA_SUFFIXES)}) or a .zip / .tar / .tar.gz archive"
            )
        rows, detected, report = _read_data_file(data_file, format, limits)
    except BaseException:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    return LoadedDataset(rows=rows, format=detected, report=report, data_file=data_file, extracted_dir=owned)


def load_and_validate(
    path: str | Path,
    *,
    format: str = "auto",
    limits: DataLimits | None = None,
    length_fn: LengthFn | None = None,
    max_length: int | None = None,
    extract_dir: str | Path | None = None,
) -> tuple[list[PreferenceRow], ValidationReport]:
    """Read a dataset and run every check: the valid rows, and the report of every problem.

    The caller decides: the service rejects a dataset whose report is not ``ok``; the CLI may train on the valid
    rows. ``length_fn`` / ``max_length``: see :func:`dama_engine.data.validation.validate_rows`. An archive is
    unpacked into ``extract_dir``; without one, into a temporary folder removed when the process exits (long-lived
    processes should pass ``extract_dir``, or use :func:`load_dataset` and close the result).
    """
    limits = limits or DataLimits()
    loaded = load_dataset(path, format=format, limits=limits, extract_dir=extract_dir)
    if loaded.extracted_dir is not None:
        # The rows' image paths point into the unpacked folder, so it must outlive this call.
        atexit.register(shutil.rmtree, loaded.extracted_dir, True)
    checks = validate_rows(loaded.rows, limits, length_fn=length_fn, max_length=max_length)
    report = loaded.report.merged(checks, max_errors=limits.max_reported_errors)
    return [row for row in loaded.rows if row.row_number not in report.invalid_row_numbers], report


def detect_format(record: Mapping[str, Any]) -> str:
    """The format a row's columns belong to, or :class:`DataFormatError` listing the accepted ones."""
    keys = set(record)
    if keys & {"input", "preferred_output", "non_preferred_output"}:
        return "openai"
    if "prompt" in keys:
        return "trl"
    if "question" in keys:
        return "rlaif_v"
    accepted = "; ".join(f"{name} ({description})" for name, description in FORMATS.items())
    raise DataFormatError(f"cannot tell the format from the first row's columns {sorted(keys)}; accepted: {accepted}")


def find_data_file(folder: Path) -> Path:
    """The one data file in ``folder`` (the shallowest; hidden files and ``__MACOSX`` are ignored)."""
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(name for name in subdirectories if not _hidden(name))
        found += [Path(directory, name) for name in files if not _hidden(name) and _is_data_file(name)]
    if not found:
        raise DataFormatError(f"no data file ({', '.join(DATA_SUFFIXES)}) found in the dataset folder")
    depth = min(len(candidate.relative_to(folder).parts) for candidate in found)
    shallowest = sorted(candidate for candidate in found if len(candidate.relative_to(folder).parts) == depth)
    if len(shallowest) > 1:
        names = ", ".join(str(candidate.relative_to(folder)) for candidate in shallowest)
        raise DataFormatError(f"several data files in the dataset folder ({names}); keep one or pass the file itself")
    return shallowest[0]


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_data_file(name: str) -> bool:
    return Path(name).suffix.lower() in DATA_SUFFIXES


# ---------------------------------------------------------------------------------------------------------------
# Archives


def archive_kind(path: Path) -> str | None:
    """``"zip"`` or ``"tar"`` (any compression tarfile reads) by content, else None."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError):
        return None


def extract_archive(archive: Path, dest: Path, *, limits: DataLimits) -> None:
    """Unpack ``archive`` into the empty folder ``dest``, refusing anything that could escape it or exhaust the disk.

    Refused: absolute member paths, ``..`` components, symbolic and hard links, device files, encrypted members,
    more than ``limits.max_archive_members`` members or ``limits.max_archive_bytes`` unpacked bytes (counted while
    writing, not trusted from headers).
    """
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise DataFormatError(f"the folder to unpack into is not empty: {dest}")
    kind = archive_kind(archive)
    try:
        if kind == "zip":
            _extract_zip(archive, dest, limits)
        elif kind == "tar":
            _extract_tar(archive, dest, limits)
        else:
            raise DataFormatError(f"{archive.name} is not a zip or tar archive")
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        raise DataFormatError(
            f"archive members conflict (a duplicate name, or a file and a folder): {error}"
        ) from error


def _member_parts(name: str) -> tuple[str, ...]:
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise DataFormatError(f"archive member {name!r} has an absolute path; members must be relative")
    parts = tuple(part for part in re.split(r"[/\\]", name) if part not in ("", "."))
    if ".." in parts:
        raise DataFormatError(f"archive member {name!r} contains '..'; members must stay inside the archive")
    if any("\x00" in part for part in parts):
        raise DataFormatError(f"archive member {name!r} has a NUL character in its name")
    return parts


def _too_many_bytes(limits: DataLimits, declared: int | None = None) -> DataLimitError:
    size = f"{declared} bytes, over" if declared is not None else "more than"
    message = f"the archive unpacks to {size} max_archive_bytes={limits.max_archive_bytes} bytes"
    return DataLimitError(message, limit="max_archive_bytes")


def _too_many_members(limits: DataLimits, count: int | None = None) -> DataLimitError:
    counted = f"{count} members, over" if count is not None else "more members than"
    message = f"the archive has {counted} max_archive_members={limits.max_archive_members}"
    return DataLimitError(message, limit="max_archive_members")


def _copy_member(source: IO[bytes], target: Path, remaining: int, limits: DataLimits) -> int:
    """Write one member (every byte counted against ``remaining``, not trusted from headers). An empty member is
    not written: no row can use it (an empty image does not decode, an empty data file has no rows), and skipping
    it keeps an archive of many empty members cheap."""
    first = source.read(_COPY_CHUNK)
    if not first:
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with target.open("xb") as out:
        chunk = first
        while chunk:
            written += len(chunk)
            if written > remaining:
                raise _too_many_bytes(limits)
            out.write(chunk)
            chunk = source.read(_COPY_CHUNK)
    return written


def _extract_zip(archive: Path, dest: Path, limits: DataLimits) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            if len(members) > limits.max_archive_members:
                raise _too_many_members(limits, len(members))
            declared = sum(member.file_size for member in members)
            if declared > limits.max_archive_bytes:
                raise _too_many_bytes(limits, declared)
            remaining = limits.max_archive_bytes
            for member in members:
                parts = _member_parts(member.filename)
                mode = member.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise DataFormatError(f"archive member {member.filename!r} is a link; links are not allowed")
                if member.flag_bits & 0x1:
                    raise DataFormatError(f"archive member {member.filename!r} is encrypted")
                if not parts:
                    continue
                target = dest.joinpath(*parts)
                if member.is_dir():  # folders are made for the files in them: empty ones are of no use
                    continue
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    raise DataFormatError(f"archive member {member.filename!r} is not a regular file")
                if member.file_size == 0:  # zipfile reads no more than declared: an empty member stays empty
                    continue
                with bundle.open(member) as source:
                    remaining -= _copy_member(source, target, remaining, limits)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError) as error:
        raise DataFormatError(f"{archive.name} is not a readable zip archive: {error}") from error


def _extract_tar(archive: Path, dest: Path, limits: DataLimits) -> None:
    try:
        with tarfile.open(archive, "r:*") as bundle:
            count = 0
            remaining = limits.max_archive_bytes
            for member in bundle:  # streamed: the limits stop a bomb before it is all read
                count += 1
                if count > limits.max_archive_members:
                    raise _too_many_members(limits)
                parts = _member_parts(member.name)
                if member.issym() or member.islnk():
                    raise DataFormatError(f"archive member {member.name!r} is a link; links are not allowed")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise DataFormatError(f"archive member {member.name!r} is not a regular file")
                if member.size > remaining:
                    raise _too_many_bytes(limits)
                if not parts or member.size == 0:
                    continue
                source = bundle.extractfile(member)
                if source is None:
                    continue
                with source:
                    remaining -= _copy_member(source, dest.joinpath(*parts), remaining, limits)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as error:
        raise DataFormatError(f"{archive.name} is not a readable tar archive: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Records: (row number, dict) from a data file, or the reason a record cannot be parsed.


@dataclass(frozen=True)
class _Malformed:
    reason: str


_Record = dict[str, Any] | _Malformed


def _iter_records(data_file: Path, limits: DataLimits) -> Iterator[tuple[int, _Record]]:
    suffix = data_file.suffix.lower()
    if suffix == ".parquet":
        return _iter_parquet(data_file)
    if suffix == ".json" and not _first_line_is_object(data_file, limits):
        return _iter_json_document(data_file, limits)
    # .jsonl, and .json files written one object per line (what HF datasets' to_json writes).
    return _iter_jsonl(data_file, limits)


def _iter_jsonl(data_file: Path, limits: DataLimits) -> Iterator[tuple[int, _Record]]:
    for number, raw in iter_lines(data_file, limits.max_line_bytes):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            yield number, _Malformed(f"not valid UTF-8 ({error.reason} at byte {error.start})")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            yield number, _Malformed(f"malformed JSON: {error.msg} at column {error.colno}")
            continue
        except RecursionError:  # json's parser recurses once per level; no row nests this deep
            yield number, _Malformed(f"JSON nested too deeply (over {sys.getrecursionlimit()} levels)")
            continue
        if not isinstance(value, dict):
            yield number, _Malformed(f"expected a JSON object, got {_type_name(value)}")
            continue
        yield number, value


def _first_line_is_object(data_file: Path, limits: DataLimits) -> bool:
    """Whether a .json file holds one row object per line (its first line parses alone as a row object)."""
    with data_file.open("rb") as handle:
        # A first line over the line limit is no row of a one-object-per-line file: the document reader decides.
        while raw := handle.readline(limits.max_line_bytes + 1):
            if len(raw) > limits.max_line_bytes:
                return False
            if raw.strip():
                try:
                    value = json.loads(raw.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return False
                return isinstance(value, dict) and not _wrapped_rows(value)
    return True


def _wrapped_rows(document: dict[str, Any]) -> list[Any] | None:
    """The rows of a ``{"data": [...]}`` (or ``{"rows": [...]}``) document."""
    if len(document) == 1:
        rows = document.get("data", document.get("rows"))
        if isinstance(rows, list):
            return rows
    return None


def _iter_json_document(data_file: Path, limits: DataLimits) -> Iterator[tuple[int, _Record]]:
    hint = "; write the rows as JSONL (one object per line), which is read a line at a time"
    check_file_size(data_file, limits.max_json_file_bytes, limit="max_json_file_bytes", hint=hint)
    try:
        document = json.loads(data_file.read_bytes())
    except json.JSONDecodeError as error:
        raise DataFormatError(
            f"{data_file.name} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{data_file.name} is not valid UTF-8: {error.reason}") from error
    if isinstance(document, dict):
        document = _wrapped_rows(document)
    if not isinstance(document, list):
        raise DataFormatError(
            f"{data_file.name} must hold a list of row objects (or {{'data': [...]}}), or one object per line"
        )
    for number, value in enumerate(document, start=1):
        yield number, value if isinstance(value, dict) else _Malformed(f"expected an object, got {_type_name(value)}")


def _iter_parquet(data_file: Path) -> Iterator[tuple[int, _Record]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise DataFormatError("reading Parquet needs the pyarrow package: pip install pyarrow") from error
    try:
        table = parquet.ParquetFile(data_file)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError variants for a damaged file
        raise DataFormatError(f"{data_file.name} is not a readable Parquet file: {error}") from error
    number = 0
    for batch in table.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            number += 1
            yield number, record


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _read_data_file(
    data_file: Path, format: str, limits: DataLimits
) -> tuple[list[PreferenceRow], str, ValidationReport]:
    builder = ReportBuilder(limits)
    base_dir = data_file.parent.absolute()
    detected: str | None = None if format == "auto" else format
    rows: list[PreferenceRow] = []
    for number, record in _iter_records(data_file, limits):
        builder.total_rows += 1
        if builder.total_rows > limits.max_rows:
            reason = f"more than max_rows={limits.max_rows} rows; reading stopped here"
            builder.add(number, None, ErrorCode.TOO_MANY_ROWS, reason)
            break
        if isinstance(record, _Malformed):
            builder.add(number, None, ErrorCode.MALFORMED_ROW, record.reason)
            continue
        if detected is None:
            detected = detect_format(record)
        context = _RowContext(number, base_dir)
        row = _CONVERTERS[detected](record, context)
        for field_path, code, reason in context.problems:
            builder.add(number, field_path, code, reason)
        if row is not None and not context.problems:
            rows.append(row)
    if detected is None:
        if builder.total_rows == 0:
            raise DataFormatError(f"{data_file.name} has no rows")
        raise DataFormatError(f"{data_file.name} has no readable row; first problem: {builder.errors[0]}")
    builder.format = detected
    return rows, detected, builder.build()


# ---------------------------------------------------------------------------------------------------------------
# Records -> canonical rows


@dataclass
class _RowContext:
    """One record being converted: its number, the folder image paths are relative to, and what went wrong."""

    number: int
    base_dir: Path
    problems: list[tuple[str | None, ErrorCode, str]] = field(default_factory=list)
    source_fields: dict[str, str] = field(default_factory=dict)

    def problem(self, field_path: str | None, code: ErrorCode, reason: str) -> None:
        self.problems.append((field_path, code, reason))

    def source(self, canonical: str, source: str) -> None:
        if canonical != source:
            self.source_fields[canonical] = source


@dataclass
class _DraftMessage:
    role: str
    path: str | None  # where the message is in the source record (None: made up, e.g. from a string prompt)
    parts: list[tuple[TextPart | ImagePart, str | None]]


def _required(record: Mapping[str, Any], key: str, context: _RowContext) -> Any:
    value = record.get(key)
    if value is None:
        context.problem(key, ErrorCode.MISSING_FIELD, "missing field")
    return value


def _text_content(content: Any, path: str, context: _RowContext) -> str | None:
    """An answer's content: a string, or text parts (joined as a chat template renders them, back to back)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for index, part in enumerate(content):
            part_path = f"{path}[{index}]"
            if not isinstance(part, dict) or part.get("type") not in _ANSWER_PARTS:
                context.problem(part_path, ErrorCode.BAD_VALUE, "an answer may hold only text parts")
                return None
            text = part.get("text")
            if not isinstance(text, str):
                context.problem(f"{part_path}.text", ErrorCode.WRONG_TYPE, f"expected a string, got {_type_name(text)}")
                return None
            texts.append(text)
        return "".join(texts)
    context.problem(path, ErrorCode.WRONG_TYPE, f"expected a string or a list of text parts, got {_type_name(content)}")
    return None


def _answer(record: Mapping[str, Any], key: str, context: _RowContext) -> tuple[str, str] | None:
    """(text, source path) of an answer column: a string, one assistant message, or a list holding one."""
    value = _required(record, key, context)
    if value is None:
        return None
    if isinstance(value, str):
        return value, key
    if isinstance(value, list):
        if len(value) != 1:
            context.problem(key, ErrorCode.BAD_VALUE, f"expected one assistant message, got {len(value)}")
            return None
        message, path = value[0], f"{key}[0]"
    else:
        message, path = value, key
    if not isinstance(message, dict):
        expected = "a string or a list with one assistant message"
        context.problem(path, ErrorCode.WRONG_TYPE, f"expected {expected}, got {_type_name(message)}")
        return None
    role = message.get("role", "assistant")
    if role != "assistant":
        context.problem(f"{path}.role", ErrorCode.BAD_VALUE, f"expected role 'assistant', got {role!r}")
        return None
    content = message.get("content")
    if content is None:
        context.problem(f"{path}.content", ErrorCode.MISSING_FIELD, "missing field")
        return None
    text = _text_content(content, f"{path}.content", context)
    return None if text is None else (text, f"{path}.content")


def _messages(
    value: Any,
    path: str,
    context: _RowContext,
    *,
    allowed_parts: tuple[str, ...],
    images: list[tuple[ImageSource, str]],
) -> list[_DraftMessage] | None:
    if not isinstance(value, list):
        context.problem(path, ErrorCode.WRONG_TYPE, f"expected a list of messages, got {_type_name(value)}")
        return None
    if not value:
        context.problem(path, ErrorCode.EMPTY_PROMPT, "the prompt has no messages")
        return None
    drafts: list[_DraftMessage] = []
    for index, message in enumerate(value):
        message_path = f"{path}[{index}]"
        if not isinstance(message, dict):
            context.problem(message_path, ErrorCode.WRONG_TYPE, f"expected a message object, got {_type_name(message)}")
            continue
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role is None:
            context.problem(f"{message_path}.role", ErrorCode.MISSING_FIELD, "missing field")
        elif role not in _ROLES:
            reason = f"role must be one of {', '.join(_ROLES)}; got {role!r}"
            context.problem(f"{message_path}.role", ErrorCode.BAD_VALUE, reason)
        content = message.get("content")
        parts: list[tuple[TextPart | ImagePart, str | None]] = []
        if content is None:
            context.problem(f"{message_path}.content", ErrorCode.MISSING_FIELD, "missing field")
        elif isinstance(content, str):
            parts.append((TextPart(content), f"{message_path}.content"))
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                parsed = _content_part(part, f"{message_path}.content[{part_index}]", context, allowed_parts, images)
                if parsed is not None:
                    parts.append(parsed)
        else:
            expected = "a string or a list of content parts"
            context.problem(f"{message_path}.content", ErrorCode.WRONG_TYPE, f"expected {expected}")
        drafts.append(_DraftMessage(role=str(role), path=message_path, parts=parts))
    return drafts


def _content_part(
    part: Any,
    path: str,
    context: _RowContext,
    allowed: tuple[str, ...],
    images: list[tuple[ImageSource, str]],
) -> tuple[TextPart | ImagePart, str | None] | None:
    if not isinstance(part, dict):
        context.problem(path, ErrorCode.WRONG_TYPE, f"expected a content part object, got {_type_name(part)}")
        return None
    kind = part.get("type")
    if kind not in allowed:
        context.problem(
            f"{path}.type", ErrorCode.BAD_VALUE, f"part type {kind!r}; expected one of {', '.join(allowed)}"
        )
        return None
    if kind in ("text", "input_text"):
        text = part.get("text")
        if not isinstance(text, str):
            code = ErrorCode.MISSING_FIELD if text is None else ErrorCode.WRONG_TYPE
            context.problem(f"{path}.text", code, "missing field" if text is None else "expected a string")
            return None
        return TextPart(text), f"{path}.text"
    if kind == "image":
        return ImagePart(), None
    # OpenAI: {"type": "image_url", "image_url": {"url": ...}} or {"type": "input_image", "image_url": "..."}.
    reference = part.get("image_url")
    url_path = f"{path}.image_url"
    if isinstance(reference, dict):
        reference, url_path = reference.get("url"), f"{url_path}.url"
    if not isinstance(reference, str):
        context.problem(url_path, ErrorCode.MISSING_FIELD, "expected an image URL (a data URI)")
        return None
    if reference[:8].lower().startswith(("http://", "https://")):
        context.problem(url_path, ErrorCode.REMOTE_IMAGE, _REMOTE_REASON)
        return None
    if not reference[:5].lower().startswith("data:"):
        context.problem(url_path, ErrorCode.BAD_VALUE, "images must be data URIs (data:image/png;base64,...)")
        return None
    source = _decode_data_uri(reference, url_path, context)
    if source is None:
        return None
    images.append((source, url_path))
    return ImagePart(), None


_REMOTE_REASON = "remote image URLs are not fetched; embed the image (base64 or a data URI) or ship the file"


def _decode_base64(text: str, path: str, context: _RowContext) -> ImageSource | None:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        context.problem(path, ErrorCode.BAD_VALUE, "not valid base64")
        return None
    if not data:
        context.problem(path, ErrorCode.BAD_VALUE, "empty image data")
        return None
    return ImageSource(data=data)


def _decode_data_uri(uri: str, path: str, context: _RowContext) -> ImageSource | None:
    header, separator, payload = uri.partition(",")
    if not separator or ";base64" not in header.lower():
        context.problem(path, ErrorCode.BAD_VALUE, "only base64 data URIs are supported (data:image/png;base64,...)")
        return None
    media_type = header[5:].split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        context.problem(path, ErrorCode.BAD_VALUE, f"data URI of type {media_type!r}, not an image")
        return None
    return _decode_base64(payload, path, context)


def _image_reference(value: Any, path: str, context: _RowContext) -> ImageSource | None:
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
            context.problem(f"{path}.bytes", ErrorCode.WRONG_TYPE, f"expected bytes or base64, got {_type_name(data)}")
            return None
        file = value.get("path")
        if isinstance(file, str) and file:
            return _image_string(file, f"{path}.path", context, allow_base64=False)
        context.problem(path, ErrorCode.MISSING_FIELD, "an image object needs 'bytes' or 'path'")
        return None
    if isinstance(value, str):
        return _image_string(value, path, context)
    expected = "a path, base64, a data URI or a {'bytes', 'path'} object"
    context.problem(path, ErrorCode.WRONG_TYPE, f"expected {expected}, got {_type_name(value)}")
    return None


def _image_string(text: str, path: str, context: _RowContext, *, allow_base64: bool = True) -> ImageSource | None:
    text = text.strip()
    head = text[:16].lower()
    if head.startswith(("http://", "https://")):
        context.problem(path, ErrorCode.REMOTE_IMAGE, _REMOTE_REASON)
        return None
    if head.startswith("data:"):
        return _decode_data_uri(text, path, context)
    if _URL_SCHEME.match(text):
        context.problem(path, ErrorCode.REMOTE_IMAGE, f"URLs are not read ({text.split(':', 1)[0]}://); ship the file")
        return None
    # Base64 has no '.', and even a 1x1 PNG takes ~90 characters; a path that happens to decode is still a path.
    looks_base64 = allow_base64 and len(text) >= 64 and "." not in text and _BASE64.fullmatch(text) is not None
    if looks_base64 and not context.base_dir.joinpath(text).exists():
        return _decode_base64(text, path, context)
    return _image_file(text, path, context)


def _image_file(relative: str, path: str, context: _RowContext) -> ImageSource | None:
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or _DRIVE.match(relative):
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


def _optional_float(record: Mapping[str, Any], key: str, context: _RowContext) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        context.problem(key, ErrorCode.WRONG_TYPE, f"expected a number, got {_type_name(value)}")
        return None
    if not math.isfinite(value):
        context.problem(key, ErrorCode.BAD_VALUE, "must be a finite number")
        return None
    return float(value)


def _row_id(record: Mapping[str, Any], context: _RowContext, keys: tuple[str, ...]) -> str:
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
        context.problem(key, ErrorCode.WRONG_TYPE, f"expected a string or an integer, got {_type_name(value)}")
    return str(context.number)


def _finish(
    record: Mapping[str, Any],
    context: _RowContext,
    *,
    drafts: list[_DraftMessage] | None,
    chosen: tuple[str, str] | None,
    rejected: tuple[str, str] | None,
    images: list[tuple[ImageSource, str]],
    consumed: set[str],
    id_keys: tuple[str, ...] = ("id",),
    answer_only: bool = False,
) -> PreferenceRow | None:
    scores = {key: _optional_float(record, key, context) for key in _OPTIONAL_FLOATS}
    row_id = _row_id(record, context, id_keys)
    if context.problems or drafts is None or chosen is None or rejected is None:
        return None
    prompt: list[Message] = []
    for message_index, draft in enumerate(drafts):
        if draft.path is not None:
            context.source(f"prompt[{message_index}].role", f"{draft.path}.role")
        for part_index, (_, source) in enumerate(draft.parts):
            if source is not None:
                context.source(f"prompt[{message_index}].content[{part_index}]", source)
        prompt.append(Message(role=cast(Role, draft.role), content=tuple(part for part, _ in draft.parts)))
    for index, (_, source) in enumerate(images):
        context.source(f"images[{index}]", source)
    context.source("chosen", chosen[1])
    if not answer_only:
        context.source("rejected", rejected[1])

    meta: dict[str, Any] = {}
    if isinstance(record.get("meta"), dict):
        meta.update(record["meta"])
    skipped = {*consumed, *_OPTIONAL_FLOATS, "id", "meta"}
    for key, value in record.items():
        if key not in skipped and not isinstance(value, bytes | bytearray):
            meta[key] = value
    if context.source_fields:
        meta[SOURCE_FIELDS_META_KEY] = dict(context.source_fields)
    return PreferenceRow(
        row_id=row_id,
        prompt=tuple(prompt),
        chosen=chosen[0],
        rejected=rejected[0],
        images=tuple(source for source, _ in images),
        chosen_score=scores["chosen_score"],
        rejected_score=scores["rejected_score"],
        hardness=scores["hardness"],
        row_number=context.number,
        meta=meta,
        answer_only=answer_only,
    )


def _from_trl(record: dict[str, Any], context: _RowContext) -> PreferenceRow | None:
    prompt = _required(record, "prompt", context)
    # TRL's prompt/completion form (one answer, for method sft): a `completion` and no preference columns.
    answer_only = "completion" in record and not {"chosen", "rejected"} & set(record)
    chosen: tuple[str, str] | None
    rejected: tuple[str, str] | None
    if answer_only:
        chosen, rejected = _answer(record, "completion", context), ("", "completion")
    else:
        chosen, rejected = _answer(record, "chosen", context), _answer(record, "rejected", context)

    images: list[tuple[ImageSource, str]] = []
    references, images_key = record.get("images"), "images"
    if references is None and record.get("image") is not None:
        references, images_key = [record["image"]], "image"  # a single-image column, as some HF sets have
    if isinstance(references, list | tuple):
        for index, reference in enumerate(references):
            path = f"images[{index}]" if images_key == "images" else "image"
            source = _image_reference(reference, path, context)
            if source is not None:
                images.append((source, path))
    elif references is not None:
        context.problem("images", ErrorCode.WRONG_TYPE, f"expected a list of images, got {_type_name(references)}")
    context.source("images", images_key)

    drafts: list[_DraftMessage] | None = None
    if isinstance(prompt, str):
        # Plain-string prompt: one user turn, one image placeholder per image before the text.
        parts: list[tuple[TextPart | ImagePart, str | None]] = [(ImagePart(), None) for _ in images]
        drafts = [_DraftMessage(role="user", path=None, parts=[*parts, (TextPart(prompt), "prompt")])]
    elif prompt is not None:
        drafts = _messages(prompt, "prompt", context, allowed_parts=_TRL_PARTS, images=[])
        if drafts and images and not any(isinstance(part, ImagePart) for d in drafts for part, _ in d.parts):
            # TRL's convention: images without placeholders belong at the start of the first user turn.
            first_user = next((d for d in drafts if d.role == "user"), drafts[0])
            first_user.parts[:0] = [(ImagePart(), None) for _ in images]
    return _finish(
        record,
        context,
        drafts=drafts,
        chosen=chosen,
        rejected=rejected,
        images=images,
        consumed={"prompt", "chosen", "rejected", "completion", images_key},
        answer_only=answer_only,
    )


def _from_rlaif_v(record: dict[str, Any], context: _RowContext) -> PreferenceRow | None:
    question = _required(record, "question", context)
    if question is not None and not isinstance(question, str):
        context.problem("question", ErrorCode.WRONG_TYPE, f"expected a string, got {_type_name(question)}")
    chosen = _answer(record, "chosen", context)
    rejected = _answer(record, "rejected", context)

    images: list[tuple[ImageSource, str]] = []
    source: ImageSource | None = None
    if record.get("image") is not None:
        source, image_key = _image_reference(record["image"], "image", context), "image"
    elif isinstance(record.get("image_path"), str):
        source, image_key = _image_string(record["image_path"], "image_path", context, allow_base64=False), "image_path"
    else:
        image_key = "image"
        context.problem("image", ErrorCode.MISSING_FIELD, "needs 'image' (bytes or base64) or 'image_path'")
    if source is not None:
        images.append((source, image_key))
    context.source("images", image_key)

    drafts = None
    if isinstance(question, str):
        drafts = [_DraftMessage(role="user", path=None, parts=[(ImagePart(), None), (TextPart(question), "question")])]
    return _finish(
        record,
        context,
        drafts=drafts,
        chosen=chosen,
        rejected=rejected,
        images=images,
        consumed={"question", "chosen", "rejected", "image", "idx"},
        id_keys=("id", "idx"),
    )


def _from_openai(record: dict[str, Any], context: _RowContext) -> PreferenceRow | None:
    conversation = _required(record, "input", context)
    images: list[tuple[ImageSource, str]] = []
    drafts: list[_DraftMessage] | None = None
    if isinstance(conversation, dict):
        if conversation.get("messages") is None:
            context.problem("input.messages", ErrorCode.MISSING_FIELD, "missing field")
        else:
            drafts = _messages(
                conversation["messages"], "input.messages", context, allowed_parts=_OPENAI_PARTS, images=images
            )
    elif conversation is not None:
        context.problem(
            "input", ErrorCode.WRONG_TYPE, f"expected an object with 'messages', got {_type_name(conversation)}"
        )
    chosen = _answer(record, "preferred_output", context)
    rejected = _answer(record, "non_preferred_output", context)
    context.source("images", "input.messages")
    return _finish(
        record,
        context,
        drafts=drafts,
        chosen=chosen,
        rejected=rejected,
        images=images,
        consumed={"input", "preferred_output", "non_preferred_output"},
    )


_CONVERTERS = {"trl": _from_trl, "rlaif_v": _from_rlaif_v, "openai": _from_openai}
