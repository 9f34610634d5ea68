"""Validate an uploaded dataset in a child process: ``python -m dama_engine.data.check``.

Untrusted archives and images are unpacked and decoded outside the API process (a decompression bomb or a
decoder crash costs a child, not the server), and the API never imports the engine. The child prints one JSON
object; :func:`check_dataset` turns every way it can say "no" into an :class:`ApiError` a user can act on.
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

logger = logging.getLogger(__name__)

CHECK_MODULE = "dama_engine.data.check"
CHECK_TIMEOUT_S = 4 * 3600.0
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


async def check_dataset(
    path: Path, *, format: str, extract_dir: Path | None, timeout_s: float = CHECK_TIMEOUT_S
) -> dict[str, Any]:
    """Run the check on ``path`` (unpacking an archive into ``extract_dir``); return its JSON when the dataset is
    usable, else raise :class:`ApiError` (400: unreadable as a whole; 422: problems in rows, all listed)."""
    command = [sys.executable, "-m", CHECK_MODULE, str(path), "--format", format]
    if extract_dir is not None:
        command += ["--extract-dir", str(extract_dir)]
    try:
        returncode, stdout, stderr = await _run(command, timeout_s)
    except TimeoutError as error:
        raise ApiError(
            422, "dataset_check_timeout", f"checking the dataset took longer than {timeout_s:.0f} s"
        ) from error
    outcome = _last_json_object(stdout)
    if outcome is None or returncode not in (0, 2):
        logger.error("dataset check exited with %s: %s", returncode, stderr[-4000:])
        if "No module named" in stderr and CHECK_MODULE.split(".")[0] in stderr:
            raise ApiError(500, "dataset_checker_missing", "the dataset checker is not installed on this server")
        raise ApiError(
            422,
            "dataset_unreadable",
            "the dataset could not be checked: the checker stopped while reading it "
            "(a corrupt archive or image, or one too large to decode?)",
        )
    if "error" in outcome and not outcome.get("ok"):
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
