"""Merged exports of a training job: ask for one (a worker makes it), follow it, download it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from api.deps import CurrentTenant, ServicesDep, SessionDep
from api.downloads import archive_responses, artifact_response, digest_headers
from api.responses import EXPORT_NOT_FOUND, JOB_NOT_FOUND, UNAUTHORIZED
from api.schemas import ErrorResponse, ExportCreate, ExportPublic, ExportsPublic
from api.services import exports

router = APIRouter(prefix="/jobs", tags=["exports"])


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
    export, created = exports.request_export(session, services, tenant_id=tenant.id, job_id=job_id, format=body.format)
    public = ExportPublic.model_validate(export)
    return public if created else JSONResponse(public.model_dump(mode="json"), status_code=200)


@router.get("/{job_id}/exports", summary="List a job's exports", responses={401: UNAUTHORIZED, 404: JOB_NOT_FOUND})
def list_exports(job_id: str, session: SessionDep, tenant: CurrentTenant) -> ExportsPublic:
    return ExportsPublic.of(exports.list_exports(session, tenant_id=tenant.id, job_id=job_id))


@router.get(
    "/{job_id}/exports/{export_id}",
    summary="Get an export",
    responses={401: UNAUTHORIZED, 404: EXPORT_NOT_FOUND},
)
def get_export(job_id: str, export_id: str, session: SessionDep, tenant: CurrentTenant) -> ExportPublic:
    export = exports.get_tenant_export(session, tenant_id=tenant.id, job_id=job_id, export_id=export_id)
    return ExportPublic.model_validate(export)


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
    archive = exports.export_archive(session, services, tenant_id=tenant.id, job_id=job_id, export_id=export_id)
    return artifact_response(
        services.artifacts,
        archive.path,
        request=request,
        media_type="application/x-tar",
        mode=services.settings.download_mode,
        filename=archive.filename,
        headers=digest_headers(archive.sha256),
    )
