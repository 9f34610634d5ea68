"""Reading a data file (.jsonl, .json, .parquet) into numbered records, and the context each row is converted
in (its number, the data file's folder, the report its problems go to).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dama_engine.data.lines import DataFormatError, check_file_size, iter_lines
from dama_engine.data.validation import DataLimits, ErrorCode

# ---------------------------------------------------------------------------------------------------------------
# Records: (row number, dict) from a data file, or the reason a record cannot be parsed.


@dataclass(frozen=True)
class Malformed:
    reason: str


Record = dict[str, Any] | Malformed


def iter_records(data_file: Path, limits: DataLimits) -> Iterator[tuple[int, Record]]:
    suffix = data_file.suffix.lower()
    if suffix == ".parquet":
        return _iter_parquet(data_file)
    if suffix == ".json" and not _first_line_is_object(data_file, limits):
        return _iter_json_document(data_file, limits)
    # .jsonl, and .json files written one object per line (what HF datasets' to_json writes).
    return _iter_jsonl(data_file, limits)


def _iter_jsonl(data_file: Path, limits: DataLimits) -> Iterator[tuple[int, Record]]:
    for number, raw in iter_lines(data_file, limits.max_line_bytes):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            yield number, Malformed(f"not valid UTF-8 ({error.reason} at byte {error.start})")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            yield number, Malformed(f"malformed JSON: {error.msg} at column {error.colno}")
            continue
        except RecursionError:  # json's parser recurses once per level; no row nests this deep
            yield number, Malformed(f"JSON nested too deeply (over {sys.getrecursionlimit()} levels)")
            continue
        if not isinstance(value, dict):
            yield number, Malformed(f"expected a JSON object, got {type_name(value)}")
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


def _iter_json_document(data_file: Path, limits: DataLimits) -> Iterator[tuple[int, Record]]:
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
        yield number, value if isinstance(value, dict) else Malformed(f"expected an object, got {type_name(value)}")


def _iter_parquet(data_file: Path) -> Iterator[tuple[int, Record]]:
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


def type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------------------
# Records -> canonical rows


@dataclass
class RowContext:
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
