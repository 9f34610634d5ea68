"""The export task: fold a succeeded training job's adapter into its base model and store the archive.

``run_export`` is a plain function (tests call it directly); the Celery task wraps it. Each run (attempt) of an
export works in its own folder, ``ArtifactStore.export_attempt_dir`` (in the worker's scratch folder with an S3
store, where the job's adapter is fetched first): the merged model is written there, packed into one uncompressed
tar (safetensors barely compress, and a plain tar serves byte ranges at once) and published to the store before
the row records it; then the merged folder goes: the archive alone is kept and counted.

While it merges, a heartbeat thread stamps the export's ``heartbeat_at``; a worker that dies (SIGKILL, OOM, lost
machine) stops stamping, and the sweeper (:mod:`worker.sweeper`) re-queues the export, or fails it after
``max_attempts`` runs, exactly as for jobs. Only the run that holds the export (its worker and attempt) records
the outcome, retried with backoff while the job store is unreachable (as a job's outcome is). A run that lost the
export (silent for a while, re-queued, taken by another run) may still be merging: it checks before it packs and
before it publishes, writes nothing outside its own folder, and removes that folder instead of recording; so the
live run's archive is never overwritten or deleted. The run that records the outcome removes earlier runs'
leftovers.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import time
from dataclasses import dataclass
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
from worker.progress import write_until
from worker.scratch import Scratch
from worker.tasks import CLAIM_RETRY, JobStoreUnavailable, WorkerContext, short_traceback, worker_name

log = logging.getLogger(__name__)


def run_export(
    export_id: str, *, session_factory: sessionmaker[Session], settings: Settings, worker: str | None = None
) -> str | None:
    """Make export ``export_id``; return its final status, or None if it was not queued (a duplicate message) or
    this run lost it to another (the sweeper re-queued it after a silence)."""
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
    run = _ExportRun(export_id, job_id, worker=worker, attempt=attempt, session_factory=session_factory, store=store)
    beat = _ExportHeartbeat(run, interval_s=settings.heartbeat_interval_s)
    # Until the outcome is stored: waiting out a database outage must not make the finished merge look dead.
    beat.start()
    try:
        with scratch.hold([store.job_dir(job_id), scratch.root / "cache", scratch.root / "models"]):
            outcome = _merge(run, spec, settings)
        if outcome is None:
            run.abandon()
            return None
        deadline = time.monotonic() + settings.store_wait_s
        status = write_until(deadline, lambda: run.record(**outcome), what=f"export {export_id}: its outcome")
        if status is not None:
            run.clean_up(succeeded=status == exports.SUCCEEDED)
        return status
    finally:
        beat.stop()
        scratch.evict()


def _merge(run: _ExportRun, spec: JobSpec, settings: Settings) -> dict[str, object] | None:
    """Merge, pack and publish into this run's own folder; the outcome to record (the archive, or the error), or
    None once the export is no longer this run's (nothing is then packed or published)."""
    folder, store = run.folder, run.store
    archive = folder / "model.tar"
    try:
        export_merged(
            model=model_section(spec, settings),
            adapter_dir=_adapter(store, run.job_id, folder),
            output_dir=folder / "model",
            adapter_name=f"{run.job_id}-{spec.suffix}" if spec.suffix else run.job_id,
            base_name=spec.model,
        )
        if not run.still_ours():
            return None
        pack_folder(folder / "model", archive, gzip=False)
        if not run.still_ours():
            return None
        store.publish(archive)  # before the row names it: any API instance can then serve it
        return {
            "path": store.recorded_path(archive),
            "size_bytes": archive.stat().st_size,
            "sha256": file_sha256(archive),
        }
    except Exception as error:
        log.warning("export %s of %s failed: %s", run.export_id, run.job_id, error)
        return {"error_message": short_traceback(error)}
    finally:
        # The archive is what is served and counted; the unpacked copies would double the storage.
        shutil.rmtree(folder / "model", ignore_errors=True)
        shutil.rmtree(folder / "adapter", ignore_errors=True)


@dataclass(frozen=True)
class _ExportRun:
    """One run (attempt) of an export: what it owns, and the job-store calls that check it still does.

    Every file the run writes is under its own :attr:`folder` (``ArtifactStore.export_attempt_dir``): a run that
    lost the export (it went silent, the sweeper re-queued it and another run took it) may still be merging, but it
    never touches the live run's files, publishes nothing once it knows, and records nothing."""

    export_id: str
    job_id: str
    worker: str
    attempt: int
    session_factory: sessionmaker[Session]
    store: ArtifactStore

    @property
    def folder(self) -> Path:
        return self.store.export_attempt_dir(self.job_id, self.export_id, self.attempt)

    def still_ours(self) -> bool:
        """Whether the export is still this run's (and a sign of life if so). True when the job store cannot say:
        publishing into this run's own folder harms no one, and the final write checks again."""
        try:
            with session_scope(self.session_factory) as session:
                return exports.heartbeat_export(
                    session, export_id=self.export_id, worker=self.worker, attempt=self.attempt
                )
        except Exception:
            log.warning("export %s: could not check that it is still this run's", self.export_id, exc_info=True)
            return True

    def record(self, **outcome: object) -> str | None:
        """Record the outcome (one transaction) if this run still holds the export; else leave it, remove this
        run's own files, and return None."""
        with session_scope(self.session_factory) as session:
            owned = exports.lock_owned_export(
                session, export_id=self.export_id, worker=self.worker, attempt=self.attempt
            )
            if owned is not None:
                return exports.finish_export(session, export=owned, **outcome).status  # type: ignore[arg-type]
            current = exports.get_export(session, export_id=self.export_id)
            if (
                current is not None
                and current.status in (exports.SUCCEEDED, exports.FAILED)
                and (current.worker, current.attempts) == (self.worker, self.attempt)
            ):
                log.info("export %s: its outcome was stored by a commit that went unheard", self.export_id)
                return current.status
        self.abandon(gone=current is None)
        return None

    def abandon(self, *, gone: bool = False) -> None:
        """The export is no longer this run's: remove what this run wrote (all of the export's files when its row
        is gone: the job was deleted meanwhile), and record nothing."""
        log.warning(
            "export %s is no longer this run's (attempt %d); its outcome is not recorded", self.export_id, self.attempt
        )
        self.store.remove(self.store.export_dir(self.job_id, self.export_id) if gone else self.folder)

    def clean_up(self, *, succeeded: bool) -> None:
        """After the outcome is recorded: earlier runs' leftovers go (a killed run's partial merge), and this run's
        folder unless it holds the recorded archive."""
        for earlier in range(1, self.attempt):
            self.store.remove(self.store.export_attempt_dir(self.job_id, self.export_id, earlier))
        if not succeeded:
            self.store.remove(self.folder)


class _ExportHeartbeat(PeriodicThread):
    """Stamps the export's ``heartbeat_at`` every ``interval_s`` while the run merges and records its outcome; stops
    once the export is no longer the run's. A failed stamp is logged and tried again next time: the merge goes on."""

    def __init__(self, run: _ExportRun, *, interval_s: float) -> None:
        self.label = f"heartbeat-{run.export_id}"
        self.export_run, self.interval_s = run, interval_s
        super().__init__()

    def run_pass(self) -> bool:
        run = self.export_run
        with session_scope(run.session_factory) as session:
            owned = exports.heartbeat_export(session, export_id=run.export_id, worker=run.worker, attempt=run.attempt)
        if not owned:
            log.warning("export %s: no longer this run's; heartbeats stop", run.export_id)
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
