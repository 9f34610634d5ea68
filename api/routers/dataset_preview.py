"""``/datasets/{id}/rows``, ``/rows/{row}/images/{index}`` and ``/hardness``: what the console's dataset page shows.

The first request for a dataset builds its preview in a child process (``python -m dama_engine.data.preview``:
the first rows, their images decoded and re-encoded as PNG, the rows' hardness values) into
``datasets/<id>/preview/``; later requests read those files. The API itself never decodes an image, and serves
only PNG files the child wrote, as ``image/png`` with ``nosniff``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from api.deps import CurrentTenant, Services, ServicesDep, SessionDep
from api.errors import ApiError, not_found
from api.schemas import ErrorResponse
from jobstore import repository
from jobstore.artifacts import ArtifactStore

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/datasets", tags=["datasets"])

PREVIEW_MODULE = "dama_engine.data.preview"
PREVIEW_ROWS = 50  # rows kept in a preview (with their images)
PREVIEW_TIMEOUT_S = 600.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# One build at a time per dataset in this process (the console asks for rows, images and hardness at once).
_BUILD_LOCKS: dict[str, asyncio.Lock] = {}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    404: {"model": ErrorResponse, "description": "No such dataset (or row, or image) for this tenant."},
}


class PreviewRowPublic(BaseModel):
    row: int = Field(description="1-based row number in the uploaded file.", examples=[1])
    row_id: str = Field(description="The row's id (its id column, else its number).", examples=["train-00000"])
    prompt: str = Field(description="The prompt's user text.", examples=["What is in this picture?"])
    chosen: str | None = Field(default=None, description="Preferred answer (preference data).", examples=["A cat."])
    rejected: str | None = Field(default=None, description="Rejected answer (preference data).", examples=["A dog."])
    objects: list[str] | None = Field(default=None, description="Objects in the image (a generative set).")
    images: list[str | None] = Field(
        description="Per image of the row, its URL on this API (GET with the key); null for an image that could "
        "not be decoded as a raster image.",
        examples=[["/datasets/ds_0194b1c2d3e4a1b2c3d4e5f6/rows/1/images/0"]],
    )
    hardness: float | None = Field(default=None, description="The row's data hardness, when the row carries it.")
    chosen_score: float | None = Field(default=None, description="User-supplied score of the chosen answer.")
    rejected_score: float | None = Field(default=None, description="User-supplied score of the rejected answer.")


class DatasetRowsPublic(BaseModel):
    dataset_id: str = Field(description="The dataset.", examples=["ds_0194b1c2d3e4a1b2c3d4e5f6"])
    format: str = Field(description="The format the rows were read as.", examples=["trl"])
    total_rows: int = Field(description="Rows in the dataset.", examples=[512])
    sampled_rows: int = Field(description=f"Rows available here: the first {PREVIEW_ROWS}.", examples=[50])
    data: list[PreviewRowPublic] = Field(description="Rows offset+1 .. offset+limit of the sample.")
    has_more: bool = Field(description="Whether the sample has rows after these.", examples=[True])


class HardnessBinPublic(BaseModel):
    low: float = Field(description="Lower edge (inclusive).", examples=[0.0])
    high: float = Field(description="Upper edge (exclusive; inclusive for the last bin).", examples=[0.1])
    count: int = Field(description="Rows in the bin.", examples=[12])


class HardnessPublic(BaseModel):
    dataset_id: str = Field(description="The dataset.", examples=["ds_0194b1c2d3e4a1b2c3d4e5f6"])
    source: str | None = Field(
        description="'rows': every row carries hardness (or chosen_score and rejected_score); null: none do, and a "
        "job scores the pairs with its CLIP hardness scorer instead (no histogram before that).",
        examples=["rows"],
    )
    count: int = Field(description="Rows with a hardness value.", examples=[512])
    min: float | None = Field(description="Smallest value.", examples=[0.02])
    max: float | None = Field(description="Largest value.", examples=[0.71])
    mean: float | None = Field(description="Mean value.", examples=[0.3])
    bins: list[HardnessBinPublic] = Field(description="Equal-width bins from min to max.")


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


async def _preview(services: Services, session: Any, tenant_id: str, dataset_id: str) -> tuple[dict[str, Any], Path]:
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


def _image_url(dataset_id: str, row: int, index: int, name: str | None) -> str | None:
    return None if name is None else f"/datasets/{dataset_id}/rows/{row}/images/{index}"


@router.get(
    "/{dataset_id}/rows",
    summary="Sample rows of a dataset",
    description=f"The first {PREVIEW_ROWS} rows as read (prompt text, both answers, image URLs, hardness), paged "
    "with offset and limit. Built on first request (a few seconds for a large dataset).",
    responses=_ERRORS,
)
async def list_rows(
    dataset_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    offset: Annotated[int, Query(ge=0, description="Rows of the sample to skip.", examples=[0])] = 0,
    limit: Annotated[int, Query(ge=1, le=PREVIEW_ROWS, description="Rows to return.", examples=[10])] = 10,
) -> DatasetRowsPublic:
    preview, _ = await _preview(services, session, tenant.id, dataset_id)
    sample = preview["rows"]
    rows = []
    for item in sample[offset : offset + limit]:
        urls = [_image_url(dataset_id, item["row"], i, name) for i, name in enumerate(item.get("images", []))]
        rows.append(PreviewRowPublic.model_validate({**item, "images": urls}))
    return DatasetRowsPublic(
        dataset_id=dataset_id,
        format=preview["format"],
        total_rows=preview["total_rows"],
        sampled_rows=len(sample),
        data=rows,
        has_more=offset + limit < len(sample),
    )


@router.get(
    "/{dataset_id}/rows/{row}/images/{index}",
    summary="An image of a sample row",
    description="The image, decoded and re-encoded as PNG (raster images only), with X-Content-Type-Options: "
    "nosniff. Only rows of the sample (GET /datasets/{id}/rows) have images here.",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The image as PNG."}, **_ERRORS},
)
async def row_image(
    dataset_id: str,
    row: Annotated[int, PathParam(ge=1, description="1-based row number.")],
    index: Annotated[int, PathParam(ge=0, le=1000, description="The image's position in the row.")],
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
) -> Response:
    _, out_dir = await _preview(services, session, tenant.id, dataset_id)
    path = out_dir / "images" / f"r{row}_{index}.png"
    content = path.read_bytes() if path.is_file() else b""
    if not content.startswith(PNG_MAGIC):
        raise ApiError(404, "image_not_found", f"no image {index} of row {row} in the dataset's sample", param="row")
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}
    return Response(content, media_type="image/png", headers=headers)


def _histogram(values: list[float], bins: int) -> list[HardnessBinPublic]:
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0  # all equal: one full bin
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return [
        HardnessBinPublic(low=low + i * width, high=low + (i + 1) * width, count=count)
        for i, count in enumerate(counts)
    ]


@router.get(
    "/{dataset_id}/hardness",
    summary="Hardness histogram of a dataset",
    description="Histogram of the data hardness the rows carry (hardness, or chosen_score - rejected_score).",
    responses=_ERRORS,
)
async def hardness_histogram(
    dataset_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    services: ServicesDep,
    bins: Annotated[int, Query(ge=1, le=100, description="Number of equal-width bins.", examples=[10])] = 10,
) -> HardnessPublic:
    preview, _ = await _preview(services, session, tenant.id, dataset_id)
    values = [float(value) for value in preview["hardness"]["values"]]
    if not values:
        return HardnessPublic(dataset_id=dataset_id, source=None, count=0, min=None, max=None, mean=None, bins=[])
    return HardnessPublic(
        dataset_id=dataset_id,
        source=preview["hardness"]["source"],
        count=len(values),
        min=min(values),
        max=max(values),
        mean=sum(values) / len(values),
        bins=_histogram(values, bins),
    )
