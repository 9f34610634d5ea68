"""The export task: fold a succeeded training job's adapter into its base model and store the archive.

``run_export`` is a plain function (tests call it directly); the Celery task wraps it. The merged folder is
written under ``ArtifactStore.export_dir`` (in the worker's scratch folder with an S3 store, where the job's
adapter is fetched first), packed into one uncompressed tar (safetensors barely compress, and a plain tar serves
byte ranges at once) and published to the store before the row records it; then the folder goes: the archive
alone is kept and counted.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

from celery import Celery, Task
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dama_engine.training import export_merged
from jobstore import exports
from jobstore.artifacts import ArtifactStore, file_sha256, open_store, pack_folder
from jobstore.broker import EXPORT_TASK
from jobstore.db import session_scope
from jobstore.models import Job
from jobstore.settings import Settings
from jobstore.spec import JobSpec
from worker.engine_config import adapter_folder, model_section
from worker.scratch import Scratch
from worker.tasks import CLAIM_RETRIES, JobStoreUnavailable, WorkerContext, short_traceback, worker_name

log = logging.getLogger(__name__)


def run_export(
    export_id: str, *, session_factory: sessionmaker[Session], settings: Settings, worker: str | None = None
) -> str | None:
    """Make export ``export_id``; return its final status, or None if it was not queued (a duplicate message)."""
    store = open_store(settings, local_root=settings.resolved_scratch_dir)
    scratch = Scratch(settings.resolved_scratch_dir, max_bytes=settings.scratch_max_bytes)
    try:
        with session_scope(session_factory) as session:
            export = exports.claim_export(session, export_id=export_id, worker=worker or worker_name())
            if export is None:
                log.info("export %s is not queued; nothing to do", export_id)
                return None
            job = session.get(Job, export.job_id)
            assert job is not None  # the export row goes with its job (ON DELETE CASCADE)
            job_id, spec = job.id, JobSpec.model_validate(job.spec)
    except OperationalError as error:
        raise JobStoreUnavailable(f"could not claim export {export_id}: {error}") from error

    folder = store.export_dir(job_id, export_id)
    archive = store.export_archive(job_id, export_id)
    try:
        with scratch.hold([store.job_dir(job_id), scratch.root / "cache", scratch.root / "models"]):
            export_merged(
                model=model_section(spec, settings),
                adapter_dir=_adapter(store, job_id, folder),
                output_dir=folder / "model",
                adapter_name=f"{job_id}-{spec.suffix}" if spec.suffix else job_id,
                base_name=spec.model,
            )
            pack_folder(folder / "model", archive, gzip=False)
            store.publish(archive)  # before the row names it: any API instance can then serve it
        outcome: dict[str, object] = {
            "path": store.recorded_path(archive),
            "size_bytes": archive.stat().st_size,
            "sha256": file_sha256(archive),
        }
    except Exception as error:
        log.warning("export %s of %s failed: %s", export_id, job_id, error)
        archive.unlink(missing_ok=True)
        outcome = {"error_message": short_traceback(error)}
    finally:
        # The archive is what is served and counted; the unpacked copies would double the storage.
        shutil.rmtree(folder / "model", ignore_errors=True)
        shutil.rmtree(folder / "adapter", ignore_errors=True)
        scratch.evict()
    with session_scope(session_factory) as session:
        claimed = exports.get_export(session, export_id=export_id)
        if claimed is None:  # the job was deleted meanwhile
            store.remove(folder)
            return None
        return exports.finish_export(session, export=claimed, **outcome).status  # type: ignore[arg-type]


def _adapter(store: ArtifactStore, job_id: str, scratch: Path) -> Path:
    """The job's adapter folder from the store, or, where the run folder was cleaned up, its archive unpacked
    into ``scratch`` (tarfile's ``data`` filter refuses links, devices and paths outside). With an S3 store both
    are fetched into this worker's scratch folder first."""
    folder = adapter_folder(store, job_id)
    if store.fetch(folder) and (folder / "adapter_config.json").is_file():
        return folder
    archive = store.adapter_archive(job_id)
    store.fetch(archive)
    unpacked = scratch / "adapter"
    with tarfile.open(archive) as bundle:
        bundle.extractall(unpacked, filter="data")
    return unpacked


def register_export_task(app: Celery, context: WorkerContext) -> None:
    @app.task(name=EXPORT_TASK, bind=True, max_retries=CLAIM_RETRIES, acks_late=False, ignore_result=True)
    def export_task(self: Task, export_id: str) -> None:
        try:
            run_export(
                export_id,
                session_factory=context.session_factory,
                settings=context.settings,
                worker=worker_name(self.request.hostname),
            )
        except JobStoreUnavailable as error:
            log.warning("%s; retrying", error)
            raise self.retry(exc=error, countdown=min(60, 5 * 2**self.request.retries)) from error
