"""Server file paths out of what tenants read: event messages and data, job errors and results.

Engine errors and tracebacks name files by their absolute path on the worker (``/srv/dama/artifacts/datasets/
ds_.../train.jsonl``, ``/usr/lib/python3/site-packages/...``). A tenant needs the file's name, not where the
server keeps it: every absolute path becomes ``.../<last part>``, except paths the tenant wrote itself (``keep``:
the strings of its job spec, such as a model folder on the workers). Applied when the job store records events
and outcomes (:mod:`jobstore.repository`) and again when the API answers (rows written before this existed).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

# An absolute POSIX path of at least two parts, not inside a URL ("https://host/a/b") or a relative path
# ("images/a.png", "llava-hf/llava-1.5-7b-hf"): the character before its first "/" is none of these.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"`,;:()\[\]{}<>|]+/)+([^\s/'\"`,;:()\[\]{}<>|]+)")


def redact_paths(text: str, keep: Collection[str] = ()) -> str:
    """``text`` with every absolute file path shortened to ``.../<file name>``, but those in ``keep``."""
    if "/" not in text:
        return text

    def shorten(match: re.Match[str]) -> str:
        return match.group(0) if match.group(0) in keep else f".../{match.group(1)}"

    return _ABSOLUTE_PATH.sub(shorten, text)


def redact_json(value: Any, keep: Collection[str] = ()) -> Any:
    """A JSON-like value with :func:`redact_paths` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return redact_paths(value, keep)
    if isinstance(value, dict):
        return {redact_json(key, keep): redact_json(item, keep) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(item, keep) for item in value]
    return value


def strings_in(value: Any) -> set[str]:
    """Every string in a JSON-like value (a job spec's: what its tenant wrote, fine to show back)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings_in(item) for item in value.values()))
    if isinstance(value, list | tuple):
        return set().union(*(strings_in(item) for item in value))
    return set()
