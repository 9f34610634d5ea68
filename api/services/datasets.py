"""Datasets: receive an upload (streamed, validated in a child process), store it, delete it.

An upload is received into ``uploads/tmp-*``, checked there, and only a dataset that passed every check is moved
to ``datasets/<id>/`` and recorded; anything rejected leaves no row and no file behind. Of an archive only the
files rows use are kept (the archive itself and unreferenced members are deleted), and ``size_bytes`` is what is
kept: that is what counts against the tenant's storage quota (``DAMA_TENANT_STORAGE_BYTES``, :mod:`jobstore.quota`).
"""

from __future__ import annotations

import logging
import re
import shutil
from typing import Any, get_args

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.cleanup import TOUCH_INTERVAL_S, keep_fresh
from api.dataset_check import DatasetChecker
from api.deps import Services
from api.errors import ApiError, not_found
from api.schemas import DatasetFormat
from api.services.idempotency import IdempotentCreate
from api.uploads import ReceivedUpload, receive_upload
from jobstore import quota, repository
from jobstore.models import Dataset, new_id

logger = logging.getLogger(__name__)

ENDPOINT = "POST /datasets"
MAX_NAME_CHARS = 300
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _data_file_name(filename: str, suffix: str) -> str:
    stem = _SAFE_NAME.sub("_", filename[: -len(suffix)] if filename.lower().endswith(suffix) else filename)
    return (stem.strip("._") or "data") + suffix


def _quota_exceeded(message: str) -> ApiError:
    return ApiError(413, "storage_quota_exceeded", message, param="file")


def _check_room(session: Session, *, tenant_id: str, quota_bytes: int | None) -> None:
    """413 before reading a byte of the upload when the tenant's storage is already full."""
    if full := quota.full_message(session, tenant_id=tenant_id, quota=quota_bytes, what="uploading"):
        raise _quota_exceeded(full)


def _form_fields(upload: ReceivedUpload) -> tuple[str, str]:
    """The upload's name and format fields, checked (422 with the field at fault)."""
    name = (upload.fields.get("name") or "").strip() or upload.filename[:MAX_NAME_CHARS]
    if len(name) > MAX_NAME_CHARS:
        raise ApiError(422, "name_too_long", f"name: at most {MAX_NAME_CHARS} characters", param="name")
    data_format = (upload.fields.get("format") or "auto").strip()
    if data_format not in get_args(DatasetFormat):
        accepted = ", ".join(get_args(DatasetFormat))
        raise ApiError(422, "unknown_format", f"format: one of {accepted}; got {data_format!r}", param="format")
    return name, data_format


def _request(upload: ReceivedUpload, *, tenant_id: str, idempotency_key: str | None) -> IdempotentCreate:
    # The file's SHA-256 stands for the body: the same key with another file is a 409.
    return IdempotentCreate(
        tenant_id=tenant_id, endpoint=ENDPOINT, key=idempotency_key, request_hash=upload.sha256, what="file"
    )


def _replay(services: Services, request: IdempotentCreate) -> Dataset | None:
    with services.session_factory() as session:
        found = request.replay(
            session,
            lambda dataset_id: repository.get_dataset(session, tenant_id=request.tenant_id, dataset_id=dataset_id),
        )
        session.commit()  # a spent key (its dataset deleted) is forgotten
        return found


def _store(
    services: Services, upload: ReceivedUpload, outcome: dict[str, Any], *, request: IdempotentCreate, name: str
) -> tuple[Dataset, bool]:
    """Move the checked upload into ``datasets/<id>/`` and record it; (dataset, replayed): a concurrent request
    with the same Idempotency-Key that committed first answers instead (its files are kept, ours removed)."""
    dataset_id, tenant_id = new_id("ds"), request.tenant_id
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

    def create() -> Dataset:
        shutil.move(str(upload.folder), str(target))  # a rename: uploads/ and datasets/ share the store's volume
        services.artifacts.publish(target)  # S3: uploaded before the dataset is recorded (workers fetch it)
        if quota_bytes is not None:
            quota.lock_tenant(session, tenant_id=tenant_id)  # concurrent uploads decide one after the other
            used = quota.tenant_storage_bytes(session, tenant_id=tenant_id)
            if used + stored_bytes > quota_bytes:
                message = quota.over_quota_message(
                    used=used, adding=stored_bytes, quota=quota_bytes, what="this dataset"
                )
                raise _quota_exceeded(message)
        return repository.create_dataset(
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

    with services.session_factory() as session:
        session.expire_on_commit = False  # the row is answered after the session closed
        dataset, replayed = request.commit(
            session,
            create=create,
            resource_id=lambda dataset: dataset.id,
            find=lambda found_id: repository.get_dataset(session, tenant_id=tenant_id, dataset_id=found_id),
            undo=lambda: services.artifacts.remove_dataset(dataset_id),
        )
    if services.artifacts.remote and not replayed:
        shutil.rmtree(target, ignore_errors=True)  # the API keeps no copy: the store has it
    return dataset, replayed


async def upload(
    request: Request, session: Session, services: Services, *, tenant_id: str, idempotency_key: str | None
) -> tuple[Dataset, bool]:
    """``POST /datasets``: (dataset, replayed). Refused before the body is read when storage is full; the body
    streams into the store with no database connection held; the rows are checked in a child process."""
    settings = services.settings
    await run_in_threadpool(_check_room, session, tenant_id=tenant_id, quota_bytes=settings.tenant_storage_bytes)
    await run_in_threadpool(session.close)  # hold no database connection while the upload streams in
    checker: DatasetChecker = request.app.state.dataset_checker
    upload = await receive_upload(
        request, uploads_dir=services.artifacts.uploads_dir(), max_bytes=settings.max_upload_bytes
    )
    try:
        name, data_format = _form_fields(upload)
        idempotent = _request(upload, tenant_id=tenant_id, idempotency_key=idempotency_key)
        if (replayed := await run_in_threadpool(_replay, services, idempotent)) is not None:
            return replayed, True
        extract_dir = None if upload.is_data_file else upload.folder / "data"
        # A check can run long: no cleaner may take the folder for a leftover meanwhile.
        async with keep_fresh(upload.folder, interval_s=min(TOUCH_INTERVAL_S, settings.stale_upload_s / 4)):
            outcome = await checker.check(upload.path, format=data_format, extract_dir=extract_dir)
            dataset, replayed_now = await run_in_threadpool(
                _store, services, upload, outcome, request=idempotent, name=name
            )
        if not replayed_now:
            logger.info("dataset %s stored for tenant %s (%d rows)", dataset.id, tenant_id, dataset.row_count)
        return dataset, replayed_now
    finally:
        upload.discard()  # a no-op once the folder was moved into the dataset store


def get_tenant_dataset(session: Session, *, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = repository.get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def delete(session: Session, services: Services, *, tenant_id: str, dataset_id: str) -> None:
    """Delete the tenant's dataset and its files; 409 while a job that has not ended reads it."""
    dataset = get_tenant_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    # Lock the row (Postgres) so a job being created on it either commits first (and is seen below) or waits
    # and finds the dataset gone.
    if not repository.lock_dataset(session, dataset=dataset):
        raise not_found("dataset", dataset_id)  # deleted by a concurrent request meanwhile
    if repository.dataset_in_use(session, dataset_id=dataset_id):
        raise ApiError(
            409, "dataset_in_use", "a job that has not ended uses this dataset; cancel it or wait for it to finish"
        )
    repository.delete_dataset(session, dataset=dataset)
    session.commit()
    services.artifacts.remove_dataset(dataset_id)


def list_datasets(session: Session, *, tenant_id: str, limit: int, after: str | None) -> tuple[list[Dataset], bool]:
    return repository.list_datasets(session, tenant_id=tenant_id, limit=limit, after=after)
