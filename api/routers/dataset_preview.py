"""``/datasets/{id}/rows``, ``/rows/{row}/images/{index}`` and ``/hardness``: what the console's dataset page shows.

The first request for a dataset builds its preview in a child process (``python -m dama_engine.data.preview``:
the first rows, their images decoded and re-encoded as PNG, the rows' hardness values) into
``datasets/<id>/preview/``; later requests read those files. The API itself never decodes an image, and serves
only PNG files the child wrote, as ``image/png`` with ``nosniff``. Building it is :mod:`api.services.previews`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from api.deps import CurrentTenant, ServicesDep, SessionDep
from api.responses import PREVIEW_NOT_FOUND, UNAUTHORIZED
from api.services import previews
from api.services.previews import PREVIEW_ROWS

router = APIRouter(prefix="/datasets", tags=["datasets"])

_ERRORS: dict[int | str, dict[str, Any]] = {401: UNAUTHORIZED, 404: PREVIEW_NOT_FOUND}


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
    preview, _ = await previews.preview(services, session, tenant.id, dataset_id)
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
    _, out_dir = await previews.preview(services, session, tenant.id, dataset_id)
    content = previews.row_image(out_dir, row=row, index=index)
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}
    return Response(content, media_type="image/png", headers=headers)


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
    preview, _ = await previews.preview(services, session, tenant.id, dataset_id)
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
        bins=[
            HardnessBinPublic(low=low, high=high, count=count) for low, high, count in previews.histogram(values, bins)
        ],
    )
