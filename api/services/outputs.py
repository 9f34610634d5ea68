"""Downloadable outputs: a training job's final adapter archive and each kept checkpoint's adapter, and the files
an evaluation or a pair generation registered (:func:`succeeded_run_output`)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from api.deps import Services
from api.downloads import safe_label
from api.errors import ApiError
from api.services.jobs import get_tenant_job
from jobstore import repository
from jobstore.artifacts import file_sha256, pack_folder
from jobstore.models import Checkpoint, Job
from jobstore.states import JobStatus


@dataclass(frozen=True)
class Archive:
    """A stored archive ready to stream: where it is, its SHA-256 and the file name offered to the client."""

    path: Path
    sha256: str
    filename: str


def adapter(session: Session, services: Services, *, tenant_id: str, job_id: str) -> Archive:
    """The succeeded job's adapter archive; 409 before it succeeded, 404 when the store lost it."""
    job = get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.status != JobStatus.succeeded.value:
        raise ApiError(
            409,
            "adapter_not_ready",
            f"the job is {job.status}; its adapter can be downloaded once it has succeeded",
        )
    store = services.artifacts
    path = store.adapter_archive(job_id)
    artifact = repository.get_artifact(session, job_id=job_id, kind="adapter")
    if not store.exists(path) or (artifact is None and not store.fetch(path)):
        raise ApiError(404, "adapter_not_found", "the job succeeded but its adapter archive is missing from the store")
    sha256 = artifact.sha256 if artifact is not None else file_sha256(path)
    label = safe_label(job.spec.get("suffix") if isinstance(job.spec, dict) else None)
    filename = f"{job_id}-{label}-adapter.tar.gz" if label else f"{job_id}-adapter.tar.gz"
    return Archive(path=path, sha256=sha256, filename=filename)


def checkpoint_adapter(session: Session, services: Services, *, tenant_id: str, job_id: str, step: int) -> Archive:
    """A kept checkpoint's adapter as an archive: packed from the files the engine wrote on the first request and
    published (with S3: downloaded into this API's working copy first), so every API instance serves the same
    stored archive; 404 when no checkpoint with an adapter is kept at ``step``."""
    get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    store = services.artifacts
    checkpoint = repository.get_checkpoint(session, job_id=job_id, step=step)
    folder = store.checkpoint_adapter_dir(job_id, checkpoint.path) if checkpoint else None
    if checkpoint is None or folder is None:
        kept = [item.step for item in repository.list_checkpoints(session, job_id=job_id)]
        raise ApiError(
            404,
            "checkpoint_not_found",
            f"step: no kept checkpoint with an adapter at step {step} (kept steps: {kept or 'none'})",
            param="step",
        )
    archive = store.checkpoint_adapter_archive(job_id, step)
    recorded = store.recorded_path(archive)
    artifact = repository.get_artifact_by_path(session, job_id=job_id, path=recorded)
    if artifact is None or not store.exists(archive):
        if store.checkpoint_adapter_dir(job_id, checkpoint.path, fetch=True) is None:
            raise ApiError(404, "checkpoint_not_found", f"step: the checkpoint at step {step} was pruned", param="step")
        pack_folder(folder, archive)
        store.publish(archive)
        artifact = repository.add_artifact(
            session,
            tenant_id=tenant_id,
            job_id=job_id,
            kind="checkpoint_adapter",
            path=recorded,
            size_bytes=archive.stat().st_size,
            sha256=file_sha256(archive),
        )
        session.commit()
        if store.remote:  # served from the store from now on: this API keeps no copies
            shutil.rmtree(folder, ignore_errors=True)
            archive.unlink(missing_ok=True)
    return Archive(path=archive, sha256=artifact.sha256, filename=f"{job_id}-step{step}-adapter.tar.gz")


def metric_series(
    session: Session, *, tenant_id: str, job_id: str, keys: list[str] | None
) -> dict[str, list[tuple[int, float]]]:
    """The job's metric series (``keys``, else every key): [step, value] pairs in step order."""
    get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    series = repository.metric_series(session, job_id=job_id, keys=keys or None)
    return {key: [(int(step), float(value)) for step, value in points] for key, points in series.items()}


def checkpoints(session: Session, *, tenant_id: str, job_id: str) -> list[Checkpoint]:
    """The job's kept checkpoints, in step order."""
    get_tenant_job(session, tenant_id=tenant_id, job_id=job_id)
    return repository.list_checkpoints(session, job_id=job_id)


def succeeded_run_output(session: Session, services: Services, *, job: Job, kind: str, what: str) -> tuple[Path, str]:
    """The local path and sha256 of the artifact of ``kind`` that a succeeded run (an evaluation, a pair
    generation) registered; 409 before it succeeded, 404 when it has none (or the store lost it)."""
    noun = job.kind.replace("_", " ")
    if job.status != JobStatus.succeeded.value:
        raise ApiError(
            409, f"{job.kind}_not_ready", f"the {noun} is {job.status}; its {what} is available once it succeeded"
        )
    artifact = repository.get_artifact(session, job_id=job.id, kind=kind)
    if artifact is None:
        raise ApiError(404, "output_not_found", f"this {noun} has no {what}")
    path = services.artifacts.local_path(artifact.path)
    if not services.artifacts.exists(path):
        raise ApiError(404, "output_not_found", f"the {noun} succeeded but its {what} is missing from the store")
    return path, artifact.sha256
