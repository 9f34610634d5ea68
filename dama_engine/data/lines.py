"""Reading data files line by line with a bound on every line, and the errors a dataset as a whole can raise.

A JSONL line is a row and is parsed whole, so its length bounds the reader's memory: :func:`iter_lines` reads at
most ``max_line_bytes + 1`` bytes per call (``readline(limit)``), never the rest of an over-long line, and raises
:class:`DataLimitError` naming the limit. A one-line 1 GiB file therefore costs one buffer of ``max_line_bytes``,
not 1 GiB (plus its decoded copy and its parsed objects).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dama_engine.errors import UserError


class DataFormatError(UserError):
    """The dataset as a whole cannot be read; the message says what is wrong and what to change."""


class DataLimitError(DataFormatError):
    """The dataset is over one of :class:`~dama_engine.data.validation.DataLimits`; ``limit`` names the field."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def iter_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, raw line)`` for every line of ``path``; :class:`DataLimitError` at the first line
    longer than ``max_line_bytes`` (the newline not counted), having read no more than that much of it."""
    with path.open("rb") as handle:
        number = 0
        while raw := handle.readline(max_line_bytes + 2):  # +2: room for "\r\n" after a line of exactly the limit
            number += 1
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:
                raise DataLimitError(
                    f"line {number} of {path.name} is longer than max_line_bytes={max_line_bytes} bytes",
                    limit="max_line_bytes",
                )
            yield number, raw


def check_file_size(path: Path, max_bytes: int, *, limit: str, hint: str = "") -> None:
    """:class:`DataLimitError` when ``path`` (read whole by its reader) is larger than ``max_bytes``."""
    size = path.stat().st_size
    if size > max_bytes:
        raise DataLimitError(f"{path.name} is {size} bytes, over {limit}={max_bytes}{hint}", limit=limit)
