"""The export task: fold a succeeded training job's adapter into its base model and store the archive.

``run_export`` is a plain function (tests call it directly); the Celery task wraps it. The merged folder is
written under ``ArtifactStore.export_dir`` (in the worker's scratch folder with an S3 store, where the job's
adapter is fetched first), packed into one uncompressed tar (safetensors barely compress, and a plain tar serves
byte ranges at once) and published to the store before the row records it; then the folder goes: the archive
alone is kept and counted.

While it merges, a heartbeat thread stamps the export's ``heartbeat_at``; a worker that dies (SIGKILL, OOM, lost
machine) stops stamping, and the sweeper (:mod:`worker.sweeper`) re-queues the export, or fails it after
``max_attempts`` runs, exactly as for jobs. Only the run that holds the export (its worker and attempt) records
the outcome.
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
from jobstore.settings import Settings
from jobstore.spec import JobSpec
from worker.engine_config import adapter_folder, model_section
from worker.periodic import PeriodicThread
from worker.scratch import Scratch
from worker.tasks import CLAIM_RETRY, JobStoreUnavailable, WorkerContext, short_traceback, worker_name

log = logging.getLogger(__name__)


def run_export(
    export_id: str, *, session_factory: sessionmaker[Session], settings: Settings, worker: str | None = None
) -> str | None:
    """Make export ``export_id``; return its final status, or None if it was not queued (a duplicate message)."""
    store = open_store(settings, local_root=settings.resolved_scratch_dir)
    scratch = Scratch(settings.resolved_scratch_dir, max_bytes=settings.scratch_max_bytes)
    worker = worker or worker_name()
    try:
        with session_scope(session_factory) as session:
            export = exports.claim_export(session, export_id=export_id, worker=worker)
            if export is None:
                log.info("export %s is not queued; nothing to do", export_id)
                return None
            attempt = export.attempts
            job = exports.job_of(session, export=export)
            job_id, spec = job.id, JobSpec.model_validate(job.spec)
    except OperationalError as error:
        raise JobStoreUnavailable(f"could not claim export {export_id}: {error}") from error
    log.info("export %s of %s claimed by %s (attempt %d)", export_id, job_id, worker, attempt)
    beat = _ExportHeartbeat(
        export_id,
        worker=worker,
        attempt=attempt,
        session_factory=session_factory,
        interval_s=settings.heartbeat_interval_s,
    )

    folder = store.export_dir(job_id, export_id)
    archive = store.export_archive(job_id, export_id)
    beat.start()
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
        beat.stop()
        # The archive is what is served and counted; the unpacked copies would double the storage.
        shutil.rmtree(folder / "model", ignore_errors=True)
        shutil.rmtree(folder / "adapter", ignore_errors=True)
        scratch.evict()
    with session_scope(session_factory) as session:
        owned = exports.lock_owned_export(session, export_id=export_id, worker=worker, attempt=attempt)
        if owned is None:  # the job was deleted meanwhile, or the export went to another run after a silence
            if exports.get_export(session, export_id=export_id) is None:
                store.remove(folder)
            log.warning(
                "export %s is no longer this run's (attempt %d); its outcome is not recorded", export_id, attempt
            )
            return None
        return exports.finish_export(session, export=owned, **outcome).status  # type: ignore[arg-type]


class _ExportHeartbeat(PeriodicThread):
    """Stamps the export's ``heartbeat_at`` every ``interval_s`` while it merges; stops once the export is no
    longer this run's. A failed stamp is logged and tried again next time: the merge goes on."""

    def __init__(
        self, export_id: str, *, worker: str, attempt: int, session_factory: sessionmaker[Session], interval_s: float
    ) -> None:
        self.label = f"heartbeat-{export_id}"
        self.export_id, self.worker, self.attempt = export_id, worker, attempt
        self.session_factory, self.interval_s = session_factory, interval_s
        super().__init__()

    def run_pass(self) -> bool:
        with session_scope(self.session_factory) as session:
            owned = exports.heartbeat_export(
                session, export_id=self.export_id, worker=self.worker, attempt=self.attempt
            )
        if not owned:
            log.warning("export %s: no longer this run's; heartbeats stop", self.export_id)
            self._stopped.set()
        return False


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
    @app.task(name=EXPORT_TASK, bind=True, acks_late=False, ignore_result=True, **CLAIM_RETRY)
    def export_task(self: Task, export_id: str) -> None:
        run_export(
            export_id,
            session_factory=context.session_factory,
            settings=context.settings,
            worker=worker_name(self.request.hostname),
        )
