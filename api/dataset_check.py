"""Validate an uploaded dataset in a child process: ``python -m dama_engine.data.check``.

Untrusted archives and images are unpacked and decoded outside the API process (a decompression bomb or a
decoder crash costs a child, not the server), and the API never imports the engine. The child prints one JSON
object; :meth:`DatasetChecker.check` turns every way it can say "no" into an :class:`ApiError` a user can act on.

Bounds, from the settings: the child's address space (``DAMA_CHECK_MEMORY_BYTES``, RLIMIT_AS, set by the child
itself: ``preexec_fn`` is unsafe in a threaded server), what an archive may unpack to, the longest line, the
largest JSON document, and how many checks one API process runs at once (``DAMA_MAX_CONCURRENT_CHECKS``; further
uploads wait for a slot). The child dies with the API process (PR_SET_PDEATHSIG) and deletes, once the dataset
passed, every unpacked file no row references. A dataset over a limit is answered 413 naming the setting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from api.errors import ApiError
from jobstore.settings import Settings

logger = logging.getLogger(__name__)

CHECK_MODULE = "dama_engine.data.check"
CHECK_TIMEOUT_S = 4 * 3600.0
# The check's limit names (DataLimits fields, and its memory) -> the setting that sets each.
LIMIT_SETTINGS = {
    "max_archive_bytes": "DAMA_MAX_EXTRACTED_BYTES",
    "max_archive_members": "DAMA_MAX_ARCHIVE_MEMBERS",
    "max_line_bytes": "DAMA_MAX_LINE_BYTES",
    "max_json_file_bytes": "DAMA_MAX_JSON_FILE_BYTES",
    "max_memory_bytes": "DAMA_CHECK_MEMORY_BYTES",
}
# What a Python (or C++) child prints when it runs out of its address space outside the check's own handler.
_OUT_OF_MEMORY = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "cannot allocate memory")
# How many row problems the error message spells out (all of them are in error.errors).
MESSAGE_ERRORS = 3
# The project root, so the child finds dama_engine when the service runs from a source checkout.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


async def _run(command: list[str], timeout_s: float) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    except BaseException:  # timeout, or the request was cancelled: never leave the child running
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")


def _last_json_object(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _describe(error: dict[str, Any]) -> str:
    where = f"row {error.get('row')}" + (f", {error['field']}" if error.get("field") else "")
    return f"{where}: {error.get('reason', error.get('code', 'invalid'))}"


class DatasetChecker:
    """Runs dataset checks for one API process: at most ``settings.max_concurrent_checks`` at once."""

    def __init__(self, settings: Settings, *, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(settings.max_concurrent_checks)

    def command(self, path: Path, *, format: str, extract_dir: Path | None) -> list[str]:
        settings = self.settings
        command = [sys.executable, "-m", CHECK_MODULE, str(path), "--format", format, "--parent-pid", str(os.getpid())]
        command += ["--max-memory-bytes", str(settings.check_memory_bytes)]
        command += ["--max-archive-bytes", str(settings.max_extracted_bytes)]
        command += ["--max-archive-members", str(settings.max_archive_members)]
        command += ["--max-line-bytes", str(settings.max_line_bytes)]
        command += ["--max-json-file-bytes", str(settings.max_json_file_bytes)]
        if extract_dir is not None:
            command += ["--extract-dir", str(extract_dir), "--keep-only-referenced"]
        return command

    async def check(self, path: Path, *, format: str, extract_dir: Path | None) -> dict[str, Any]:
        """Run the check on ``path`` (unpacking an archive into ``extract_dir``, keeping only what rows use);
        return its JSON when the dataset is usable, else raise :class:`ApiError` (400: unreadable as a whole;
        413: over a limit; 422: problems in rows, all listed; 503: no check slot came free in time)."""
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.settings.check_slot_wait_s)
        except TimeoutError as error:
            raise ApiError(
                503,
                "dataset_checks_busy",
                f"every dataset check slot of this server is busy (DAMA_MAX_CONCURRENT_CHECKS="
                f"{self.settings.max_concurrent_checks}); retry later",
                headers={"Retry-After": "60"},
            ) from error
        try:
            return await self._check(path, format=format, extract_dir=extract_dir)
        finally:
            self._slots.release()

    async def _check(self, path: Path, *, format: str, extract_dir: Path | None) -> dict[str, Any]:
        command = self.command(path, format=format, extract_dir=extract_dir)
        try:
            returncode, stdout, stderr = await _run(command, self.timeout_s)
        except TimeoutError as error:
            raise ApiError(
                422, "dataset_check_timeout", f"checking the dataset took longer than {self.timeout_s:.0f} s"
            ) from error
        outcome = _last_json_object(stdout)
        if outcome is None or returncode not in (0, 2):
            logger.error("dataset check exited with %s: %s", returncode, stderr[-4000:])
            if "No module named" in stderr and CHECK_MODULE.split(".")[0] in stderr:
                raise ApiError(500, "dataset_checker_missing", "the dataset checker is not installed on this server")
            if any(sign in stderr for sign in _OUT_OF_MEMORY):
                raise _over_limit("max_memory_bytes", "checking the dataset needs more memory than this service allows")
            raise ApiError(
                422,
                "dataset_unreadable",
                "the dataset could not be checked: the checker stopped while reading it "
                "(a corrupt archive or image, or one too large to decode?)",
            )
        return _accepted(outcome)


def _over_limit(limit: str, message: str) -> ApiError:
    """413 naming the setting behind ``limit`` (the engine's message names the DataLimits field)."""
    setting = LIMIT_SETTINGS.get(limit)
    if setting is None:
        return ApiError(400, "invalid_dataset", message, param="file")
    message = message.replace(f"{limit}=", f"{setting}=")
    if setting not in message:
        message += f" ({setting})"
    return ApiError(413, "dataset_too_large", message, param="file")


def _accepted(outcome: dict[str, Any]) -> dict[str, Any]:
    if "error" in outcome and not outcome.get("ok"):
        if outcome.get("limit"):
            raise _over_limit(str(outcome["limit"]), str(outcome["error"]))
        raise ApiError(400, "invalid_dataset", str(outcome["error"]), param="file")
    report = outcome.get("report") or {}
    errors = [error for error in report.get("errors", []) if isinstance(error, dict)]
    if not outcome.get("ok") or errors or report.get("errors_omitted"):
        invalid = report.get("invalid_rows", len({error.get("row") for error in errors}))
        total = report.get("total_rows", outcome.get("row_count", 0))
        listed = "; ".join(_describe(error) for error in errors[:MESSAGE_ERRORS])
        more = len(errors) - MESSAGE_ERRORS + int(report.get("errors_omitted", 0))
        message = f"{invalid} of {total} rows have problems: {listed}"
        if more > 0:
            message += f"; and {more} more (see error.errors)"
        raise ApiError(422, "invalid_rows", message, param="file", errors=errors)
    if int(outcome.get("row_count", 0)) == 0:
        raise ApiError(422, "empty_dataset", "the dataset has no rows", param="file")
    return outcome
