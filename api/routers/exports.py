"""Merged exports of a training job: ask for one (a worker makes it), follow it, download it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from api.deps import CurrentTenant, ServicesDep, SessionDep
from api.downloads import archive_responses, artifact_response, digest_headers, safe_label
from api.errors import ApiError
from api.routers.jobs import JOB_NOT_FOUND, UNAUTHORIZED, get_tenant_job
from api.schemas import ErrorResponse, ExportCreate, ExportPublic, ExportsPublic
from jobstore import exports
from jobstore.broker import enqueue_export
from jobstore.models import Export
from jobstore.states import JobStatus

router = APIRouter(prefix="/jobs", tags=["exports"])

EXPORT_NOT_FOUND: dict[str, Any] = {"model": ErrorResponse, "description": "No such job or export for this tenant."}


def _tenant_export(session: SessionDep, *, tenant_id: str, job_id: str, export_id: str) -> Export:
    get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    export = exports.get_export(session, export_id=export_id, job_id=job_id)
    if export is None:
        raise ApiError(404, "export_not_found", f"no export {export_id} of job {job_id}", param="export_id")
    return export


@router.post(
    "/{job_id}/exports",
    summary="Export a job's adapter merged into its base model",
    description="Starts a merged export on a worker of the job's queue: base + adapter folded together (peft "
    "`merge_and_unload`), written as safetensors with the processor files and a model card. Answers 202 with the "
    "queued export; poll `GET /jobs/{id}/exports/{export_id}` and download once it has succeeded. Asking again "
    "while an export of that format is queued, running or done answers 200 with that export; after a failure it "
    "starts a new one.",
    status_code=202,
    response_model=ExportPublic,
    responses={
        200: {"model": ExportPublic, "description": "An export of this format already exists (not failed)."},
        401: UNAUTHORIZED,
        404: JOB_NOT_FOUND,
        409: {"model": ErrorResponse, "description": "The job has not succeeded: it has no adapter to export."},
    },
)
def create_export(
    job_id: str, body: ExportCreate, session: SessionDep, tenant: CurrentTenant, services: ServicesDep
) -> Any:
    job = get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    if job.status != JobStatus.succeeded.value:
        raise ApiError(409, "job_not_succeeded", f"the job is {job.status}; only a succeeded job can be exported")
    existing = exports.reusable_export(session, job_id=job_id, format=body.format)
    if existing is not None:
        return JSONResponse(ExportPublic.model_validate(existing).model_dump(mode="json"), status_code=200)
    export = exports.create_export(session, tenant_id=tenant.id, job_id=job_id, format=body.format)
    public = ExportPublic.model_validate(export)
    session.commit()
    enqueue_export(services.celery, export_id=export.id, queue=job.queue)
    return public


@router.get("/{job_id}/exports", summary="List a job's exports", responses={401: UNAUTHORIZED, 404: JOB_NOT_FOUND})
def list_exports(job_id: str, session: SessionDep, tenant: CurrentTenant) -> ExportsPublic:
    get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    items = [ExportPublic.model_validate(item) for item in exports.list_exports(session, job_id=job_id)]
    return ExportsPublic(data=items, has_more=False, next_cursor=None)


@router.get(
    "/{job_id}/exports/{export_id}",
    summary="Get an export",
    responses={401: UNAUTHORIZED, 404: EXPORT_NOT_FOUND},
)
def get_export(job_id: str, export_id: str, session: SessionDep, tenant: CurrentTenant) -> ExportPublic:
    return ExportPublic.model_validate(_tenant_export(session, tenant_id=tenant.id, job_id=job_id, export_id=export_id))


@router.get(
    "/{job_id}/exports/{export_id}/download",
    summary="Download an export",
    description="The merged model as a tar (model.safetensors or its shards with the index, config.json, "
    "generation config, processor and tokenizer files, README.md), once the export succeeded. `X-Content-SHA256` "
    "and `Repr-Digest` carry its SHA-256; Range requests (`Range: bytes=START-END`) fetch it in parts or resume "
    "a broken download. With an S3 store and `DAMA_DOWNLOAD_MODE=redirect`: 307 to a presigned link.",
    response_class=FileResponse,
    responses={
        **archive_responses("The merged model archive.", "application/x-tar"),
        401: UNAUTHORIZED,
        404: EXPORT_NOT_FOUND,
        409: {"model": ErrorResponse, "description": "The export has not succeeded (yet)."},
    },
)
def download_export(
    job_id: str, export_id: str, request: Request, session: SessionDep, tenant: CurrentTenant, services: ServicesDep
) -> Response:
    export = _tenant_export(session, tenant_id=tenant.id, job_id=job_id, export_id=export_id)
    if export.status != exports.SUCCEEDED or export.sha256 is None or export.path is None:
        raise ApiError(409, "export_not_ready", f"the export is {export.status}; download it once it has succeeded")
    store = services.artifacts
    # The row names the stored object (an s3:// URI with S3); the API streams it from the store, no local copy.
    archive = store.local_path(export.path)
    if not store.exists(archive):
        raise ApiError(404, "export_file_missing", "the export succeeded but its archive is missing from the store")
    job = get_tenant_job(session, tenant_id=tenant.id, job_id=job_id)
    label = safe_label(job.spec.get("suffix") if isinstance(job.spec, dict) else None)
    stem = f"{job_id}-{label}" if label else job_id
    return artifact_response(
        store,
        archive,
        request=request,
        media_type="application/x-tar",
        mode=services.settings.download_mode,
        filename=f"{stem}-{export.format}.tar",
        headers=digest_headers(export.sha256),
    )
