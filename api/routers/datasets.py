"""``/datasets``: upload (streamed, validated in a child process), list, get, delete (the work is in
:mod:`api.services.datasets`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status

from api.deps import After, CurrentTenant, Limit, ServicesDep, SessionDep
from api.responses import DATASET_NOT_FOUND, UNAUTHORIZED
from api.schemas import DatasetPublic, DatasetsPublic, ErrorResponse
from api.services import datasets

router = APIRouter(prefix="/datasets", tags=["datasets"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Retry safely: the same key with the same file returns the dataset created the first time.",
    ),
]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {"$ref": "#/components/schemas/DatasetUpload"}}},
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a dataset",
    description="Upload preference pairs with their images as multipart/form-data: a .jsonl / .json / .parquet "
    "file (images embedded as base64 or data URIs) or a .zip / .tar / .tar.gz archive of a data file plus the "
    "images it references by relative path. A generative evaluation set (for POST /evaluations) is an archive "
    "of a JSONL file of {image, prompt, objects} rows, vocabulary.json and the images; it is stored with format "
    "'generative'. A prompt set (for POST /pair-generations with a judge) is the same without objects: format "
    "'prompts'. Every row is checked; a dataset with any problem is rejected (422, "
    "every problem listed with its row number and field) and nothing is stored. Returns 200 instead of 201 when an "
    "Idempotency-Key replays an earlier upload.",
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": DatasetPublic, "description": "Replayed: the dataset an earlier request with this key made."},
        400: {"model": ErrorResponse, "description": "Unreadable as a whole (unsafe archive, no data file...)."},
        401: UNAUTHORIZED,
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with a different file."},
        413: {
            "model": ErrorResponse,
            "description": "Over a limit, named in the message: the upload (DAMA_MAX_UPLOAD_BYTES), what it unpacks "
            "to or holds (DAMA_MAX_EXTRACTED_BYTES, DAMA_MAX_ARCHIVE_MEMBERS, DAMA_MAX_LINE_BYTES, "
            "DAMA_MAX_JSON_FILE_BYTES, DAMA_CHECK_MEMORY_BYTES), or the tenant's storage (DAMA_TENANT_STORAGE_BYTES).",
        },
        415: {"model": ErrorResponse, "description": "Not multipart/form-data."},
        422: {"model": ErrorResponse, "description": "Rows with problems (all in error.errors), or bad form fields."},
        503: {"model": ErrorResponse, "description": "Every dataset check slot is busy; retry after Retry-After."},
    },
)
async def upload_dataset(
    request: Request,
    response: Response,
    tenant: CurrentTenant,
    session: SessionDep,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> DatasetPublic:
    dataset, replayed = await datasets.upload(
        request, session, services, tenant_id=tenant.id, idempotency_key=idempotency_key
    )
    if replayed:
        response.status_code = status.HTTP_200_OK
    return DatasetPublic.model_validate(dataset)


@router.get("", summary="List datasets", responses={401: UNAUTHORIZED})
def list_datasets(session: SessionDep, tenant: CurrentTenant, limit: Limit = 20, after: After = None) -> DatasetsPublic:
    rows, has_more = datasets.list_datasets(session, tenant_id=tenant.id, limit=limit, after=after)
    return DatasetsPublic.of(rows, has_more=has_more)


@router.get("/{dataset_id}", summary="Get a dataset", responses={401: UNAUTHORIZED, 404: DATASET_NOT_FOUND})
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DatasetPublic:
    return DatasetPublic.model_validate(
        datasets.get_tenant_dataset(session, tenant_id=tenant.id, dataset_id=dataset_id)
    )


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset",
    description="Removes the dataset and its files. Refused (409) while a queued or running job reads it.",
    responses={
        401: UNAUTHORIZED,
        404: DATASET_NOT_FOUND,
        409: {"model": ErrorResponse, "description": "A job that has not ended uses the dataset."},
    },
)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant, services: ServicesDep) -> Response:
    datasets.delete(session, services, tenant_id=tenant.id, dataset_id=dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
