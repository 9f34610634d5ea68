"""Leftovers of a killed API process: upload folders (``uploads/tmp-*``) and dataset check processes.

A live upload touches its folder every :data:`TOUCH_INTERVAL_S` (:func:`keep_fresh`) while it streams and is
checked, so a folder nothing touched for ``DAMA_STALE_UPLOAD_S`` belongs to a process that died: another replica's
upload in flight on a shared volume is never taken. A check process whose parent is no longer the API that started
it (``--parent-pid``) is orphaned: nobody will read its answer. Checks die with their API (PR_SET_PDEATHSIG), so
this catches what that cannot (a platform without it, or checks started by an older version: those have no
``--parent-pid`` and count as orphaned once adopted by init and older than the threshold). Both run at API start
and every ``DAMA_CLEANUP_INTERVAL_S`` (:func:`run_periodically`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import psutil
from fastapi.concurrency import run_in_threadpool

from api.dataset_check import CHECK_MODULE

logger = logging.getLogger(__name__)

UPLOAD_PREFIX = "tmp-"
TOUCH_INTERVAL_S = 60.0


def last_touched(folder: Path) -> float:
    """The newest modification time of the folder and what it holds directly (the upload file, ``data/``)."""
    newest = folder.stat().st_mtime
    for entry in os.scandir(folder):
        with suppress(FileNotFoundError):
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def remove_stale_uploads(uploads_dir: Path, *, older_than_s: float, now: float | None = None) -> list[Path]:
    """Remove the upload folders untouched for ``older_than_s``; return them."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    if not uploads_dir.is_dir():
        return removed
    for folder in uploads_dir.iterdir():
        if not folder.name.startswith(UPLOAD_PREFIX) or not folder.is_dir():
            continue
        try:
            if now - last_touched(folder) < older_than_s:
                continue
        except FileNotFoundError:  # its upload finished (moved or discarded) meanwhile
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _parent_pid_argument(command: list[str]) -> int | None:
    if "--parent-pid" in command:
        position = command.index("--parent-pid") + 1
        if position < len(command) and command[position].isdigit():
            return int(command[position])
    return None


def kill_orphaned_checks(*, older_than_s: float, now: float | None = None) -> list[int]:
    """Kill dataset check processes whose API is gone; return their pids."""
    now = time.time() if now is None else now
    killed: list[int] = []
    for process in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
        info = process.info
        command = info.get("cmdline") or []
        if "-m" not in command or CHECK_MODULE not in command:
            continue
        parent = _parent_pid_argument(command)
        if parent is not None:
            orphaned = info["ppid"] != parent
        else:  # started by a version without --parent-pid: adopted by init, and old
            orphaned = info["ppid"] == 1 and now - info["create_time"] >= older_than_s
        if not orphaned:
            continue
        with suppress(psutil.Error):
            process.kill()
            killed.append(info["pid"])
    return killed


def clean_up(uploads_dir: Path, *, older_than_s: float) -> None:
    for folder in remove_stale_uploads(uploads_dir, older_than_s=older_than_s):
        logger.warning("removed the stale upload folder %s (untouched for %.0f s)", folder.name, older_than_s)
    for pid in kill_orphaned_checks(older_than_s=older_than_s):
        logger.warning("killed the orphaned dataset check process %d", pid)


async def run_periodically(uploads_dir: Path, *, older_than_s: float, interval_s: float) -> None:
    """:func:`clean_up` now and every ``interval_s`` until cancelled; a failure is logged, never raised."""
    while True:
        try:
            await run_in_threadpool(clean_up, uploads_dir, older_than_s=older_than_s)
        except Exception:
            logger.exception("cleaning up stale uploads failed")
        await asyncio.sleep(interval_s)


@asynccontextmanager
async def keep_fresh(folder: Path, *, interval_s: float = TOUCH_INTERVAL_S) -> AsyncIterator[None]:
    """Touch ``folder`` every ``interval_s`` while the block runs, so no cleaner takes it for a leftover."""

    async def touch() -> None:
        while True:
            await asyncio.sleep(interval_s)
            with suppress(FileNotFoundError):
                os.utime(folder)

    task = asyncio.create_task(touch())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
