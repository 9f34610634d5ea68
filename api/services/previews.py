"""A dataset's preview: what the console's dataset page shows (sample rows, their images, hardness values).

The first request for a dataset builds its preview in a child process (``python -m dama_engine.data.preview``:
the first rows, their images decoded and re-encoded as PNG, the rows' hardness values) into
``datasets/<id>/preview/``; later requests read those files. The API itself never decodes an image, and serves
only PNG files the child wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.deps import Services
from api.errors import ApiError, not_found
from jobstore import repository
from jobstore.artifacts import ArtifactStore

logger = logging.getLogger(__name__)

PREVIEW_MODULE = "dama_engine.data.preview"
PREVIEW_ROWS = 50  # rows kept in a preview (with their images)
PREVIEW_TIMEOUT_S = 600.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# One build at a time per dataset in this process (the console asks for rows, images and hardness at once).
_BUILD_LOCKS: dict[str, asyncio.Lock] = {}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


async def _build(data_dir: Path, out_dir: Path, data_format: str) -> None:
    command = [sys.executable, "-m", PREVIEW_MODULE, str(data_dir), str(out_dir)]
    command += ["--format", data_format, "--sample", str(PREVIEW_ROWS)]
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_child_env(),
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=PREVIEW_TIMEOUT_S)
    except BaseException:  # timeout or a cancelled request: never leave the child running
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if process.returncode != 0 and not (out_dir / "preview.json").is_file():
        logger.error("dataset preview of %s exited with %s: %s", data_dir, process.returncode, stderr[-4000:])
        raise ApiError(500, "preview_failed", "the dataset's preview could not be built")


async def _build_from_store(store: ArtifactStore, data_dir: Path, out_dir: Path, data_format: str) -> None:
    """Build the preview from the dataset's files (with S3, a temporary local copy) and keep it in the store."""
    await run_in_threadpool(store.fetch, data_dir)
    try:
        await _build(data_dir, out_dir, data_format)
        await run_in_threadpool(store.publish, out_dir)
    finally:
        if store.remote:
            await run_in_threadpool(shutil.rmtree, data_dir, True)


async def preview(services: Services, session: Session, tenant_id: str, dataset_id: str) -> tuple[dict[str, Any], Path]:
    """The dataset's preview (built on first use) and its folder; 404 for another tenant's dataset."""
    dataset = await run_in_threadpool(repository.get_dataset, session, tenant_id=tenant_id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    store = services.artifacts
    data_dir, data_format = store.local_path(dataset.path), dataset.format
    await run_in_threadpool(session.close)  # no database connection held while the child runs
    out_dir = store.dataset_dir(dataset_id) / "preview"
    if not (out_dir / "preview.json").is_file():
        async with _BUILD_LOCKS.setdefault(dataset_id, asyncio.Lock()):
            await run_in_threadpool(store.fetch, out_dir)  # S3: built already, by this or another replica?
            if not (out_dir / "preview.json").is_file():
                await _build_from_store(store, data_dir, out_dir, data_format)
        _BUILD_LOCKS.pop(dataset_id, None)
    preview: dict[str, Any] = json.loads((out_dir / "preview.json").read_text(encoding="utf-8"))
    return preview, out_dir


def row_image(out_dir: Path, *, row: int, index: int) -> bytes:
    """The PNG the child wrote for image ``index`` of sample row ``row``; 404 when there is none."""
    path = out_dir / "images" / f"r{row}_{index}.png"
    content = path.read_bytes() if path.is_file() else b""
    if not content.startswith(PNG_MAGIC):
        raise ApiError(404, "image_not_found", f"no image {index} of row {row} in the dataset's sample", param="row")
    return content


def histogram(values: list[float], bins: int) -> list[tuple[float, float, int]]:
    """``bins`` equal-width bins from min to max of ``values``: (low, high, count) each."""
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0  # all equal: one full bin
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return [(low + i * width, low + (i + 1) * width, count) for i, count in enumerate(counts)]
