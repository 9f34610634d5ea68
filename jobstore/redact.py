"""Server file paths out of what tenants read: event messages and data, job errors and results.

Engine errors and tracebacks name files by their absolute path on the worker (``/srv/dama/artifacts/datasets/
ds_.../train.jsonl``, ``/usr/lib/python3/site-packages/...``). A tenant needs the file's name, not where the
server keeps it: every absolute path becomes ``.../<last part>``. Applied when the job store records events and
outcomes (:mod:`jobstore.repository`) and again when the API answers (rows written before this existed).
"""

from __future__ import annotations

import re
from typing import Any

# An absolute POSIX path of at least two parts, not inside a URL ("https://host/a/b") or a relative path
# ("images/a.png", "llava-hf/llava-1.5-7b-hf"): the character before its first "/" is none of these.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"`,;:()\[\]{}<>|]+/)+([^\s/'\"`,;:()\[\]{}<>|]+)")


def redact_paths(text: str) -> str:
    """``text`` with every absolute file path shortened to ``.../<file name>``."""
    if "/" not in text:
        return text
    return _ABSOLUTE_PATH.sub(r".../\1", text)


def redact_json(value: Any) -> Any:
    """A JSON-like value with :func:`redact_paths` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return redact_paths(value)
    if isinstance(value, dict):
        return {redact_json(key): redact_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(item) for item in value]
    return value
