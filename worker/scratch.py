"""A worker's scratch folder (``DAMA_SCRATCH_DIR``): a bounded local cache of what its jobs need.

Entries are the children of its areas: ``datasets/<id>`` and ``jobs/<id>`` (copies staged from an S3 store),
``cache/<entry>`` (reference log-probs and hardness, shared by jobs on the same data and model) and
``models/<entry>`` (the built-in tiny models, the Hugging Face cache). When the folder holds more than
``DAMA_SCRATCH_MAX_BYTES``, entries are removed least recently used first (an entry's last use is its
modification time: a job touches each entry it uses when it starts) until it fits, skipping every entry a running
job holds. A running job holds its datasets, its job folder and the whole ``cache`` and ``models`` areas (which
entries of those a run opens is the engine's business); holds are small files under ``.holds/`` naming the
process, so worker processes sharing one scratch folder respect each other's, and a dead process's holds lapse.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobstore.artifacts import path_bytes

log = logging.getLogger(__name__)

AREAS = ("datasets", "jobs", "cache", "models")


class Scratch:
    def __init__(self, root: Path, *, max_bytes: int | None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._holds = root / ".holds"

    @contextmanager
    def hold(self, paths: list[Path]) -> Iterator[None]:
        """Keep ``paths`` (entries or whole areas) from eviction while the block runs; mark them used now."""
        self._holds.mkdir(parents=True, exist_ok=True)
        marker = self._holds / f"{os.getpid()}-{id(paths)}.json"
        marker.write_text(json.dumps([str(p.resolve()) for p in paths]))
        for path in paths:
            if path.exists():
                os.utime(path)
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    def held(self) -> set[Path]:
        """The paths held by live processes (the holds of dead ones are removed)."""
        held: set[Path] = set()
        for marker in self._holds.glob("*.json") if self._holds.is_dir() else ():
            pid = int(marker.name.split("-", 1)[0])
            if not _alive(pid):
                marker.unlink(missing_ok=True)
                continue
            try:
                held.update(Path(p) for p in json.loads(marker.read_text()))
            except (OSError, ValueError):  # removed or being written just now: its owner is alive, be safe
                continue
        return held

    def entries(self) -> list[Path]:
        return [entry for area in AREAS if (self.root / area).is_dir() for entry in (self.root / area).iterdir()]

    def evict(self) -> list[Path]:
        """Remove least recently used entries until the folder fits its bound; return what was removed."""
        if self.max_bytes is None:
            return []
        entries = {entry: path_bytes(entry) for entry in self.entries()}
        total = sum(entries.values())
        held = self.held()
        removed: list[Path] = []
        for entry in sorted(entries, key=_last_use):
            if total <= self.max_bytes:
                break
            resolved = entry.resolve()
            if any(resolved == h or h in resolved.parents for h in held):
                continue
            log.info("scratch over %d bytes: removing %s (least recently used)", self.max_bytes, entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            total -= entries[entry]
            removed.append(entry)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_use(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
