"""A merged export is recovered like a job: a SIGKILLed worker's export is re-queued by the next worker's sweeper
and finishes, on Postgres + Redis and on the embedded default (SQLite + the filesystem broker); an export whose
worker keeps dying ends ``failed`` with its reason after ``max_attempts`` runs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from alembic import command
from alembic.config import Config
from celery import Celery
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from jobstore import exports, repository
from jobstore.artifacts import pack_folder
from jobstore.broker import enqueue_export, make_celery
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import Export
from jobstore.settings import Settings
from tests.worker.conftest import FAST, QUEUE_PREFIX, ROOT, JobStore, WorkerProcess, tiny_spec, wait_for
from worker.engine_config import ensure_tiny_model, model_cache_root
from worker.sweeper import sweep

pytestmark = pytest.mark.slow


def _export_of_a_succeeded_job(store: JobStore, *, queue: str, adapter_dir: Path) -> str:
    """A succeeded training job with a real LoRA adapter archive, and a queued export of it on ``queue``."""
    job_id = store.create_job(tiny_spec(store.dataset(8)), queue=queue)
    with session_scope(store.factory) as session:
        job = repository.claim_job(session, job_id=job_id, worker="trainer")
        assert job is not None
        repository.set_status(session, job=job, status="succeeded", result={})
    base = AutoModelForImageTextToText.from_pretrained(ensure_tiny_model("llava", model_cache_root(store.settings)))
    torch.manual_seed(0)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(adapter_dir)
    pack_folder(adapter_dir, store.artifacts.adapter_archive(job_id))
    with session_scope(store.factory) as session:
        export = exports.create_export(session, tenant_id=store.tenant_id, job_id=job_id, format="merged", queue=queue)
        return export.id


def _export(store: JobStore, export_id: str) -> Export:
    with session_scope(store.factory) as session:
        export = exports.get_export(session, export_id=export_id)
        assert export is not None
        return export


def _kill_mid_export_then_recover(store: JobStore, app: Celery, log_dir: Path, tmp_path: Path) -> None:
    queue = f"{QUEUE_PREFIX}-export-{secrets.token_hex(3)}"
    export_id = _export_of_a_succeeded_job(store, queue=queue, adapter_dir=tmp_path / "adapter")
    first = WorkerProcess(store.settings, queue, log_dir, "export1")
    try:
        enqueue_export(app, export_id=export_id, queue=queue)
        wait_for(lambda: _export(store, export_id).status != "queued", timeout=60, interval=0.005, what="a claim")
        first.kill()  # SIGKILL: no handler runs; the export stays running and its heartbeats stop
    finally:
        first.stop()
    killed = _export(store, export_id)
    assert killed.status == "running", f"the export ended before the kill ({killed.status}):\n{first.log()}"
    assert killed.attempts == 1 and killed.worker is not None and killed.worker.startswith("export1@")

    second = WorkerProcess(store.settings, queue, log_dir, "export2")  # its sweeper re-queues the silent export
    try:
        wait_for(lambda: _export(store, export_id).status in ("succeeded", "failed"), timeout=120, what="the export")
        export = _export(store, export_id)
        assert export.status == "succeeded", (export.error_message, second.log())
        assert export.attempts == 2 and export.worker is not None and export.worker.startswith("export2@")
        archive = store.artifacts.export_archive(export.job_id, export_id, 2)  # the run that recorded it
        assert export.path == str(archive) and archive.is_file() and export.size_bytes == archive.stat().st_size
    finally:
        second.stop()


@pytest.fixture(scope="module")
def embedded_store(store: JobStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobStore]:
    """The embedded default: SQLite under the home folder, the filesystem broker, local artifacts."""
    home = tmp_path_factory.mktemp("embedded-home")
    settings = Settings(
        home=home,
        artifacts_dir=home / "artifacts",
        model_cache_dir=store.settings.model_cache_dir,  # the tiny model, built once for the session
        **FAST,
    )
    assert settings.resolved_database_url.startswith("sqlite") and settings.resolved_broker_url == "filesystem://"
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = settings.resolved_database_url
    command.upgrade(config, "head")
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        tenant_id = repository.get_or_create_tenant(session, name="embedded").id
    yield JobStore(settings=settings, factory=factory, tenant_id=tenant_id)
    engine.dispose()


@pytest.mark.parametrize("store_fixture", ["store", "embedded_store"], ids=["postgres", "embedded_default"])
def test_a_killed_workers_export_is_requeued_and_finishes(
    store_fixture: str, request: pytest.FixtureRequest, worker_log_dir: Path, tmp_path: Path
) -> None:
    job_store: JobStore = request.getfixturevalue(store_fixture)
    app = make_celery(job_store.settings)
    try:
        _kill_mid_export_then_recover(job_store, app, worker_log_dir, tmp_path)
    finally:
        app.close()


def test_an_export_whose_worker_keeps_dying_fails_with_its_reason_after_the_retry_limit(store: JobStore) -> None:
    """Each run claims it and goes silent; the sweeper re-queues it until max_attempts runs, then fails it."""
    settings = store.settings.model_copy(update={"heartbeat_timeout_s": 0.2})
    queue = f"{QUEUE_PREFIX}-nowhere"  # no worker listens: only the sweeper acts
    job_id = store.create_job(tiny_spec(store.dataset(8)), queue=queue)
    with session_scope(store.factory) as session:
        export = exports.create_export(session, tenant_id=store.tenant_id, job_id=job_id, format="merged", queue=queue)
        export_id = export.id
    app = make_celery(settings)
    outcomes = []
    try:
        for attempt in range(1, settings.max_attempts + 1):
            with session_scope(store.factory) as session:
                claimed = exports.claim_export(session, export_id=export_id, worker=f"dead-{attempt}")
                assert claimed is not None and claimed.attempts == attempt
                # Silent since well before the timeout: the worker died right after claiming.
                claimed.heartbeat_at = claimed.heartbeat_at - timedelta(seconds=10)  # type: ignore[operator]
            done = sweep(store.factory, app, settings)
            outcomes.append(_export(store, export_id).status)
            assert done[f"export_{'requeued' if attempt < settings.max_attempts else 'failed'}"] == 1, done
    finally:
        app.close()
    assert outcomes == ["queued"] * (settings.max_attempts - 1) + ["failed"]
    export = _export(store, export_id)
    assert export.error_message == f"the worker stopped responding {settings.max_attempts} times; giving up"
    assert export.finished_at is not None and export.sha256 is None
