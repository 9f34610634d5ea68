"""Checks on canonical preference rows, collecting every problem into one report.

Nothing here stops at the first bad row: each problem becomes a :class:`RowError` (1-based row number, the field
path as the user wrote it, a machine-readable code and a reason), and the :class:`ValidationReport` says how many
rows are usable. The caller decides what to do: the service rejects a dataset with any error, the CLI may drop the
bad rows. Over-long rows are reported, never truncated here (ARCHITECTURE.md, data flow step 3).
Reading and checking in one call: :func:`dama_engine.data.formats.load_and_validate`.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from PIL import Image

from dama_engine.data.rows import ImagePart, ImageSource, PreferenceRow, TextPart
from dama_engine.errors import UserError

# Key in PreferenceRow.meta where the readers record, per canonical field path ("chosen", "images[0]",
# "prompt[0].content[1]"), the path in the user's file ("preferred_output[0].content"), so reports name the latter.
SOURCE_FIELDS_META_KEY = "_source_fields"


class DataError(UserError):
    """The data cannot be trained on; ``errors`` lists each bad row (row number, field, reason).

    Defined here, torch-free, so the data layer (the generative eval set loader, :mod:`dama_engine.data.generative`)
    raises it without the trainer; :mod:`dama_engine.data` exports it."""

    def __init__(self, message: str, errors: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


class ErrorCode(StrEnum):
    MALFORMED_ROW = "malformed_row"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_VALUE = "bad_value"
    EMPTY_PROMPT = "empty_prompt"
    EMPTY_ANSWER = "empty_answer"
    IDENTICAL_ANSWERS = "identical_answers"
    REMOTE_IMAGE = "remote_image"
    IMAGE_NOT_FOUND = "image_not_found"
    UNDECODABLE_IMAGE = "undecodable_image"
    IMAGE_TOO_LARGE = "image_too_large"
    PLACEHOLDER_MISMATCH = "placeholder_mismatch"
    TEXT_TOO_LONG = "text_too_long"
    TOO_MANY_ROWS = "too_many_rows"
    TOO_MANY_TOKENS = "too_many_tokens"


@dataclass(frozen=True)
class DataLimits:
    """Bounds on what a dataset may contain; every one is checked and reported, none silently applied."""

    max_rows: int = 1_000_000
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * 1024 * 1024
    max_text_chars: int = 20_000
    # Archives (zip bombs): number of members and their total uncompressed size.
    max_archive_members: int = 1_000_000
    max_archive_bytes: int = 20 * 1024**3
    # A JSONL line (one row) is parsed whole, and a JSON document (a list of rows) is read whole: these bound the
    # reader's memory. The service passes smaller ones (DAMA_MAX_LINE_BYTES, DAMA_MAX_JSON_FILE_BYTES).
    max_line_bytes: int = 256 * 1024**2
    max_json_file_bytes: int = 1024**3
    # The report keeps this many errors in full and counts the rest (every bad row is still counted).
    max_reported_errors: int = 10_000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DataLimits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class RowError:
    """One problem in one row. ``row`` is 1-based (for JSONL: the line number); ``field`` is None for the row."""

    row: int
    field: str | None
    code: str
    reason: str

    def __str__(self) -> str:
        where = f"row {self.row}" + (f", {self.field}" if self.field else "")
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "field": self.field, "code": str(self.code), "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RowError:
        return cls(row=int(data["row"]), field=data.get("field"), code=str(data["code"]), reason=str(data["reason"]))


@dataclass
class ValidationReport:
    """What was read and what is wrong with it.

    ``total_rows`` counts every record read (malformed ones included), ``valid_rows`` those without any error.
    ``errors`` holds up to ``DataLimits.max_reported_errors`` entries in row order; ``errors_omitted`` counts the
    rest. ``invalid_row_numbers`` is kept in memory only (not in :meth:`to_dict`).
    """

    total_rows: int = 0
    valid_rows: int = 0
    errors: list[RowError] = field(default_factory=list)
    errors_omitted: int = 0
    format: str | None = None
    invalid_row_numbers: set[int] = field(default_factory=set, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors and self.errors_omitted == 0

    @property
    def invalid_rows(self) -> int:
        return self.total_rows - self.valid_rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for storing beside a dataset and for the API."""
        return {
            "ok": self.ok,
            "format": self.format,
            "total_rows": self.total_rows,
            "valid_rows": self.valid_rows,
            "invalid_rows": self.invalid_rows,
            "errors": [error.to_dict() for error in self.errors],
            "errors_omitted": self.errors_omitted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        errors = [RowError.from_dict(error) for error in data.get("errors", [])]
        return cls(
            total_rows=int(data["total_rows"]),
            valid_rows=int(data["valid_rows"]),
            errors=errors,
            errors_omitted=int(data.get("errors_omitted", 0)),
            format=data.get("format"),
            invalid_row_numbers={error.row for error in errors},
        )

    def merged(self, other: ValidationReport, *, max_errors: int | None = None) -> ValidationReport:
        """This report plus ``other``'s errors over the same rows (``total_rows`` is this report's)."""
        invalid = self.invalid_row_numbers | other.invalid_row_numbers
        errors = sorted([*self.errors, *other.errors], key=lambda error: error.row)
        omitted = self.errors_omitted + other.errors_omitted
        if max_errors is not None and len(errors) > max_errors:
            omitted += len(errors) - max_errors
            errors = errors[:max_errors]
        return ValidationReport(
            total_rows=self.total_rows,
            valid_rows=self.total_rows - len(invalid),
            errors=errors,
            errors_omitted=omitted,
            format=self.format or other.format,
            invalid_row_numbers=invalid,
        )

    def __str__(self) -> str:
        fmt = f" ({self.format})" if self.format else ""
        lines = [f"{self.total_rows} rows{fmt}: {self.valid_rows} valid, {self.invalid_rows} invalid"]
        lines += [f"  {error}" for error in self.errors]
        if self.errors_omitted:
            lines.append(f"  ... and {self.errors_omitted} more errors")
        return "\n".join(lines)


class ReportBuilder:
    """Collects errors row by row, keeping at most ``limits.max_reported_errors`` in full."""

    def __init__(self, limits: DataLimits, *, format: str | None = None) -> None:
        self.limits = limits
        self.format = format
        self.total_rows = 0
        self.errors: list[RowError] = []
        self.errors_omitted = 0
        self.invalid_row_numbers: set[int] = set()

    def add(self, row: int, field: str | None, code: ErrorCode, reason: str) -> None:
        self.invalid_row_numbers.add(row)
        if len(self.errors) < self.limits.max_reported_errors:
            self.errors.append(RowError(row=row, field=field, code=str(code), reason=reason))
        else:
            self.errors_omitted += 1

    def mark_invalid(self, row: int) -> None:
        self.invalid_row_numbers.add(row)

    def is_invalid(self, row: int) -> bool:
        return row in self.invalid_row_numbers

    def build(self) -> ValidationReport:
        return ValidationReport(
            total_rows=self.total_rows,
            valid_rows=self.total_rows - len(self.invalid_row_numbers),
            errors=sorted(self.errors, key=lambda error: error.row),
            errors_omitted=self.errors_omitted,
            format=self.format,
            invalid_row_numbers=set(self.invalid_row_numbers),
        )


LengthFn = Callable[[PreferenceRow], int]


def validate_rows(
    rows: Sequence[PreferenceRow],
    limits: DataLimits | None = None,
    length_fn: LengthFn | None = None,
    max_length: int | None = None,
) -> ValidationReport:
    """Check canonical rows and report every problem.

    ``length_fn(row)`` returns the row's full token count, image tokens included (the longer of prompt+chosen and
    prompt+rejected); with ``max_length`` set, longer rows are reported. It runs only on rows that passed every other
    check (it needs decodable images); a ``ValueError`` it raises becomes that row's error. A row whose
    ``row_number`` is 0 is numbered by its position (1-based).
    """
    limits = limits or DataLimits()
    if (length_fn is None) != (max_length is None):
        raise ValueError("validate_rows: pass both length_fn and max_length, or neither")
    builder = ReportBuilder(limits)
    image_cache: dict[str | bytes, tuple[ErrorCode, str] | None] = {}
    for position, row in enumerate(rows, start=1):
        number = row.row_number or position
        builder.total_rows += 1
        if position > limits.max_rows:
            if position == limits.max_rows + 1:
                reason = f"more than max_rows={limits.max_rows} rows; this row and all after it are not used"
                builder.add(number, None, ErrorCode.TOO_MANY_ROWS, reason)
            else:
                builder.mark_invalid(number)
            continue
        _check_row(row, number, limits, builder, image_cache)
        if length_fn is not None and max_length is not None and not builder.is_invalid(number):
            _check_length(row, number, length_fn, max_length, builder)
    return builder.build()


def _source_field(row: PreferenceRow, canonical: str) -> str:
    mapping = row.meta.get(SOURCE_FIELDS_META_KEY)
    if isinstance(mapping, dict):
        return str(mapping.get(canonical, canonical))
    return canonical


def _check_row(
    row: PreferenceRow,
    number: int,
    limits: DataLimits,
    builder: ReportBuilder,
    image_cache: dict[str | bytes, tuple[ErrorCode, str] | None],
) -> None:
    def report(canonical: str | None, code: ErrorCode, reason: str) -> None:
        builder.add(number, None if canonical is None else _source_field(row, canonical), code, reason)

    if not row.prompt:
        report("prompt", ErrorCode.EMPTY_PROMPT, "the prompt has no messages")
    elif row.prompt[-1].role != "user":
        report(f"prompt[{len(row.prompt) - 1}].role", ErrorCode.BAD_VALUE, "the prompt must end with a user message")
    for m, message in enumerate(row.prompt):
        for p, part in enumerate(message.content):
            if isinstance(part, TextPart) and len(part.text) > limits.max_text_chars:
                reason = f"text is {len(part.text)} characters, over max_text_chars={limits.max_text_chars}"
                report(f"prompt[{m}].content[{p}]", ErrorCode.TEXT_TOO_LONG, reason)

    answers = (("chosen", row.chosen),) if row.answer_only else (("chosen", row.chosen), ("rejected", row.rejected))
    for name, answer in answers:
        if not answer.strip():
            report(name, ErrorCode.EMPTY_ANSWER, "empty answer")
        elif len(answer) > limits.max_text_chars:
            reason = f"answer is {len(answer)} characters, over max_text_chars={limits.max_text_chars}"
            report(name, ErrorCode.TEXT_TOO_LONG, reason)
    if row.chosen.strip() and row.chosen.strip() == row.rejected.strip():
        report("rejected", ErrorCode.IDENTICAL_ANSWERS, "rejected is identical to chosen")

    placeholders = sum(isinstance(part, ImagePart) for message in row.prompt for part in message.content)
    if placeholders != len(row.images):
        reason = f"the prompt has {placeholders} image placeholder(s) but the row has {len(row.images)} image(s)"
        report("images", ErrorCode.PLACEHOLDER_MISMATCH, reason)

    for k, source in enumerate(row.images):
        problem = _check_image(source, limits, image_cache)
        if problem is not None:
            report(f"images[{k}]", *problem)


def _check_image(
    source: ImageSource, limits: DataLimits, cache: dict[str | bytes, tuple[ErrorCode, str] | None]
) -> tuple[ErrorCode, str] | None:
    """Size and decodability of one image; results are cached (RLAIF-V reuses each image for several pairs)."""
    if source.path is not None:
        key: str | bytes = str(source.path)
        if key in cache:
            return cache[key]
        try:
            size = source.path.stat().st_size
        except FileNotFoundError:
            cache[key] = (ErrorCode.IMAGE_NOT_FOUND, f"image file not found: {_short(source.path)}")
            return cache[key]
        except OSError as error:
            cache[key] = (ErrorCode.UNDECODABLE_IMAGE, f"cannot read image file {_short(source.path)}: {error}")
            return cache[key]
        if size > limits.max_image_bytes:
            cache[key] = (ErrorCode.IMAGE_TOO_LARGE, f"{size} bytes, over max_image_bytes={limits.max_image_bytes}")
            return cache[key]
        try:
            data = source.path.read_bytes()
        except OSError as error:
            cache[key] = (ErrorCode.UNDECODABLE_IMAGE, f"cannot read image file {_short(source.path)}: {error}")
            return cache[key]
    else:
        assert source.data is not None
        data = source.data
        key = hashlib.sha1(data).digest()
        if key in cache:
            return cache[key]
    cache[key] = _decode_problem(data, limits)
    return cache[key]


def _decode_problem(data: bytes, limits: DataLimits) -> tuple[ErrorCode, str] | None:
    if len(data) > limits.max_image_bytes:
        return ErrorCode.IMAGE_TOO_LARGE, f"{len(data)} bytes, over max_image_bytes={limits.max_image_bytes}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    reason = f"{width}x{height} pixels, over max_image_pixels={limits.max_image_pixels}"
                    return ErrorCode.IMAGE_TOO_LARGE, reason
                # A full decode: a truncated file must fail here, not in the middle of training.
                image.load()
        except Image.DecompressionBombError as error:
            # Pillow refuses at open what is far over its own limit; the limit that applies here is ours.
            declared = re.search(r"\((\d+) pixels\)", str(error))
            size = f"{declared.group(1)} pixels, " if declared else ""
            return ErrorCode.IMAGE_TOO_LARGE, f"{size}over max_image_pixels={limits.max_image_pixels}"
        except Exception as error:  # PIL raises many types for corrupt data; every one is the row's problem
            return ErrorCode.UNDECODABLE_IMAGE, f"not a decodable image ({type(error).__name__}: {error})"
    return None


def _short(path: Path) -> str:
    """The last two components of a path: enough to find the file without exposing where data is unpacked."""
    return "/".join(path.parts[-2:])


def _check_length(
    row: PreferenceRow, number: int, length_fn: LengthFn, max_length: int, builder: ReportBuilder
) -> None:
    try:
        length = length_fn(row)
    except ValueError as error:
        # dama_engine.forward.batching.EncodingError carries the field and a reason; other ValueErrors give a message.
        field_name = getattr(error, "field", None)
        reason = getattr(error, "reason", None) or str(error)
        builder.add(number, field_name if isinstance(field_name, str) else None, ErrorCode.TOO_MANY_TOKENS, reason)
        return
    if length > max_length:
        reason = (
            f"{length} tokens with image tokens, over max_length={max_length}; rows are never truncated here: "
            "shorten the row or raise max_length"
        )
        builder.add(number, None, ErrorCode.TOO_MANY_TOKENS, reason)
