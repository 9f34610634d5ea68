"""``/datasets``: upload (streamed, validated in a child process), list, get, delete.

An upload is received into ``uploads/tmp-*``, checked there, and only a dataset that passed every check is moved
to ``datasets/<id>/`` and recorded; anything rejected leaves no row and no file behind. Of an archive only the
files rows use are kept (the archive itself and unreferenced members are deleted), and ``size_bytes`` is what is
kept: that is what counts against the tenant's storage quota (``DAMA_TENANT_STORAGE_BYTES``, :mod:`jobstore.quota`).
"""

from __future__ import annotations

import logging
import re
import shutil
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Header, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.cleanup import TOUCH_INTERVAL_S, keep_fresh
from api.dataset_check import DatasetChecker
from api.deps import After, CurrentTenant, Limit, Services, ServicesDep, SessionDep
from api.errors import ApiError, not_found
from api.schemas import DatasetFormat, DatasetPublic, DatasetsPublic, ErrorResponse, dataset_public
from api.uploads import ReceivedUpload, receive_upload
from jobstore import quota, repository
from jobstore.db import session_scope
from jobstore.models import new_id

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/datasets", tags=["datasets"])

ENDPOINT = "POST /datasets"
MAX_NAME_CHARS = 300
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

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
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in {
        401: "Missing or invalid API key.",
        404: "No such dataset for this tenant.",
    }.items()
}


def _replay(services: Services, *, tenant_id: str, key: str, sha256: str) -> DatasetPublic | None:
    """The dataset an earlier upload with this key created (None: the key is new, or its dataset was deleted)."""
    with session_scope(services.session_factory) as session:
        record = repository.find_idempotency_key(session, tenant_id=tenant_id, endpoint=ENDPOINT, key=key)
        if record is None:
            return None
        if record.request_hash != sha256:
            raise ApiError(
                409,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different file; use a new key for a new upload",
                param="Idempotency-Key",
            )
        dataset = repository.get_dataset(session, tenant_id=tenant_id, dataset_id=record.resource_id)
        if dataset is None:  # deleted since: the key is spent, the upload makes a new dataset
            session.delete(record)
            return None
        return dataset_public(dataset)


def _data_file_name(filename: str, suffix: str) -> str:
    stem = _SAFE_NAME.sub("_", filename[: -len(suffix)] if filename.lower().endswith(suffix) else filename)
    return (stem.strip("._") or "data") + suffix


def _quota_exceeded(message: str) -> ApiError:
    return ApiError(413, "storage_quota_exceeded", message, param="file")


def _check_room(session: Session, *, tenant_id: str, quota_bytes: int | None) -> None:
    """413 before reading a byte of the upload when the tenant's storage is already full."""
    if full := quota.full_message(session, tenant_id=tenant_id, quota=quota_bytes, what="uploading"):
        raise _quota_exceeded(full)


def _store(
    services: Services,
    upload: ReceivedUpload,
    outcome: dict[str, Any],
    *,
    tenant_id: str,
    name: str,
    idempotency_key: str | None,
) -> DatasetPublic | None:
    """Move the checked upload into ``datasets/<id>/`` and record it; None when a concurrent request with the same
    Idempotency-Key won (the caller replays it)."""
    dataset_id = new_id("ds")
    data_dir = upload.folder / "data"
    if upload.is_data_file:
        data_dir.mkdir(exist_ok=True)
        upload.path.rename(data_dir / _data_file_name(upload.filename, upload.suffix))
    else:
        upload.path.unlink()  # unpacked into data/ (only what rows use): the archive itself is not needed
    stored_bytes = quota.folder_bytes(data_dir)
    quota_bytes = services.settings.tenant_storage_bytes
    target = services.artifacts.dataset_dir(dataset_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.move(str(upload.folder), str(target))  # a rename: uploads/ and datasets/ share the store's volume
        services.artifacts.publish(target)  # S3: uploaded before the dataset is recorded (workers fetch it)
        with session_scope(services.session_factory) as session:
            if quota_bytes is not None:
                quota.lock_tenant(session, tenant_id=tenant_id)  # concurrent uploads decide one after the other
                used = quota.tenant_storage_bytes(session, tenant_id=tenant_id)
                if used + stored_bytes > quota_bytes:
                    message = quota.over_quota_message(
                        used=used, adding=stored_bytes, quota=quota_bytes, what="this dataset"
                    )
                    raise _quota_exceeded(message)
            dataset = repository.create_dataset(
                session,
                dataset_id=dataset_id,
                tenant_id=tenant_id,
                name=name,
                format=str(outcome.get("format") or "unknown"),
                row_count=int(outcome.get("row_count", 0)),
                image_count=int(outcome.get("image_count", 0)),
                size_bytes=stored_bytes,
                sha256=upload.sha256,
                path=services.artifacts.recorded_path(target / "data"),
                report=dict(outcome.get("report") or {}),
            )
            if idempotency_key is not None:
                repository.remember_idempotency_key(
                    session,
                    tenant_id=tenant_id,
                    endpoint=ENDPOINT,
                    key=idempotency_key,
                    request_hash=upload.sha256,
                    resource_id=dataset_id,
                )
            public = dataset_public(dataset)
    except IntegrityError:
        services.artifacts.remove_dataset(dataset_id)
        if idempotency_key is None:
            raise
        return None
    except BaseException:
        services.artifacts.remove_dataset(dataset_id)
        raise
    if services.artifacts.remote:
        shutil.rmtree(target, ignore_errors=True)  # the API keeps no copy: the store has it
    return public


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a dataset",
    description="Upload preference pairs with their images as multipart/form-data: a .jsonl / .json / .parquet "
    "file (images embedded as base64 or data URIs) or a .zip / .tar / .tar.gz archive of a data file plus the "
    "images it references by relative path. A generative evaluation set (for POST /evaluations) is an archive "
    "of a JSONL file of {image, prompt, objects} rows, vocabulary.json and the images; it is stored with format "
    "'generative'. Every row is checked; a dataset with any problem is rejected (422, "
    "every problem listed with its row number and field) and nothing is stored. Returns 200 instead of 201 when an "
    "Idempotency-Key replays an earlier upload.",
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": DatasetPublic, "description": "Replayed: the dataset an earlier request with this key made."},
        400: {"model": ErrorResponse, "description": "Unreadable as a whole (unsafe archive, no data file...)."},
        401: _ERRORS[401],
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
    tenant_id = tenant.id
    settings = services.settings
    await run_in_threadpool(_check_room, session, tenant_id=tenant_id, quota_bytes=settings.tenant_storage_bytes)
    await run_in_threadpool(session.close)  # hold no database connection while the upload streams in
    checker: DatasetChecker = request.app.state.dataset_checker
    upload = await receive_upload(
        request, uploads_dir=services.artifacts.uploads_dir(), max_bytes=settings.max_upload_bytes
    )
    try:
        name = (upload.fields.get("name") or "").strip() or upload.filename[:MAX_NAME_CHARS]
        if len(name) > MAX_NAME_CHARS:
            raise ApiError(422, "name_too_long", f"name: at most {MAX_NAME_CHARS} characters", param="name")
        data_format = (upload.fields.get("format") or "auto").strip()
        if data_format not in get_args(DatasetFormat):
            accepted = ", ".join(get_args(DatasetFormat))
            raise ApiError(422, "unknown_format", f"format: one of {accepted}; got {data_format!r}", param="format")
        if idempotency_key is not None:
            replayed = await run_in_threadpool(
                _replay, services, tenant_id=tenant_id, key=idempotency_key, sha256=upload.sha256
            )
            if replayed is not None:
                response.status_code = status.HTTP_200_OK
                return replayed
        extract_dir = None if upload.is_data_file else upload.folder / "data"
        # A check can run long: no cleaner may take the folder for a leftover meanwhile.
        async with keep_fresh(upload.folder, interval_s=min(TOUCH_INTERVAL_S, settings.stale_upload_s / 4)):
            outcome = await checker.check(upload.path, format=data_format, extract_dir=extract_dir)
            created = await run_in_threadpool(
                _store, services, upload, outcome, tenant_id=tenant_id, name=name, idempotency_key=idempotency_key
            )
        if created is None:  # a concurrent request with the same key committed first
            assert idempotency_key is not None
            replayed = await run_in_threadpool(
                _replay, services, tenant_id=tenant_id, key=idempotency_key, sha256=upload.sha256
            )
            if replayed is None:
                raise ApiError(409, "idempotency_conflict", "a concurrent request used this Idempotency-Key; retry")
            response.status_code = status.HTTP_200_OK
            return replayed
        logger.info("dataset %s stored for tenant %s (%d rows)", created.id, tenant_id, created.row_count)
        return created
    finally:
        upload.discard()  # a no-op once the folder was moved into the dataset store


@router.get("", summary="List datasets", responses={401: _ERRORS[401]})
def list_datasets(session: SessionDep, tenant: CurrentTenant, limit: Limit = 20, after: After = None) -> DatasetsPublic:
    rows, has_more = repository.list_datasets(session, tenant_id=tenant.id, limit=limit, after=after)
    return DatasetsPublic(
        data=[dataset_public(row) for row in rows],
        has_more=has_more,
        next_cursor=rows[-1].id if has_more and rows else None,
    )


@router.get("/{dataset_id}", summary="Get a dataset", responses={401: _ERRORS[401], 404: _ERRORS[404]})
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DatasetPublic:
    dataset = repository.get_dataset(session, tenant_id=tenant.id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset_public(dataset)


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset",
    description="Removes the dataset and its files. Refused (409) while a queued or running job reads it.",
    responses={
        401: _ERRORS[401],
        404: _ERRORS[404],
        409: {"model": ErrorResponse, "description": "A job that has not ended uses the dataset."},
    },
)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant, services: ServicesDep) -> Response:
    dataset = repository.get_dataset(session, tenant_id=tenant.id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    # Lock the row (Postgres) so a job being created on it either commits first (and is seen below) or waits
    # and finds the dataset gone.
    session.refresh(dataset, with_for_update=True)
    if repository.dataset_in_use(session, dataset_id=dataset_id):
        raise ApiError(
            409, "dataset_in_use", "a job that has not ended uses this dataset; cancel it or wait for it to finish"
        )
    repository.delete_dataset(session, dataset=dataset)
    session.commit()
    services.artifacts.remove_dataset(dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
