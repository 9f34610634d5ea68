"""The export task called as a plain function: it merges from the archive when the run folder is gone, a broken
adapter fails the export (never the job), a duplicate message does nothing, a run that lost the export to another
leaves the live run's archive alone, and the outcome is recorded through a job-store outage."""

from __future__ import annotations

import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from sqlalchemy.exc import OperationalError
from transformers import AutoModelForImageTextToText

from jobstore import exports, repository
from jobstore.artifacts import file_sha256, pack_folder
from jobstore.db import session_scope
from jobstore.models import Export, utcnow
from tests.worker.conftest import JobStore, tiny_spec, wait_for
from worker import exports as export_task
from worker.engine_config import adapter_folder, ensure_tiny_model, model_cache_root
from worker.exports import run_export


def _succeeded_job_with_export(store: JobStore) -> tuple[str, str]:
    job_id = store.create_job(tiny_spec(store.dataset(8)), queue="exports-test")
    with session_scope(store.factory) as session:
        job = repository.claim_job(session, job_id=job_id, worker="w")
        assert job is not None
        repository.set_status(session, job=job, status="succeeded", result={})
        export = exports.create_export(session, tenant_id=store.tenant_id, job_id=job_id, format="merged")
        return job_id, export.id


def _export(store: JobStore, export_id: str) -> Export:
    with session_scope(store.factory) as session:
        export = exports.get_export(session, export_id=export_id)
        assert export is not None
        return export


def test_merges_from_the_adapter_archive(store: JobStore, tmp_path: Path) -> None:
    job_id, export_id = _succeeded_job_with_export(store)
    # Only the archive is left (the run folder was cleaned up): the task unpacks it.
    base = AutoModelForImageTextToText.from_pretrained(ensure_tiny_model("llava", model_cache_root(store.settings)))
    torch.manual_seed(0)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    pack_folder(tmp_path / "adapter", store.artifacts.adapter_archive(job_id))

    assert run_export(export_id, session_factory=store.factory, settings=store.settings, worker="w1") == "succeeded"
    export = _export(store, export_id)
    archive = store.artifacts.export_archive(job_id, export_id, 1)
    assert export.path == str(archive) and export.sha256 == file_sha256(archive)
    assert export.size_bytes == archive.stat().st_size and export.worker == "w1"
    with tarfile.open(archive) as bundle:
        names = set(bundle.getnames())
    assert {"config.json", "model.safetensors", "README.md"} <= names
    # Only the archive stays: no unpacked copies double the tenant's storage.
    assert [path.name for path in archive.parent.iterdir()] == ["model.tar"]
    assert run_export(export_id, session_factory=store.factory, settings=store.settings) is None  # a duplicate


def test_a_missing_adapter_fails_the_export_not_the_job(store: JobStore) -> None:
    job_id, export_id = _succeeded_job_with_export(store)
    assert run_export(export_id, session_factory=store.factory, settings=store.settings) == "failed"
    export = _export(store, export_id)
    assert export.error_message is not None and "adapter.tar.gz" in export.error_message
    assert export.sha256 is None and export.finished_at is not None
    assert not store.artifacts.export_dir(job_id, export_id).exists() or not any(
        store.artifacts.export_dir(job_id, export_id).iterdir()
    )
    assert store.job(job_id).status == "succeeded"


def _with_adapter_folder(store: JobStore) -> tuple[str, str]:
    """A succeeded job whose adapter folder is on the store (the merge itself is replaced in these tests)."""
    job_id, export_id = _succeeded_job_with_export(store)
    folder = adapter_folder(store.artifacts, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    return job_id, export_id


def _merge_writing(content: bytes) -> Any:
    """A stand-in for ``export_merged`` that writes one file with ``content`` (the real merge: test above)."""

    def merge(*, output_dir: Path, **_: Any) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "model.safetensors").write_bytes(content)

    return merge


def _requeue(store: JobStore, export_id: str) -> None:
    """What the sweeper does to a run it thinks dead: re-queue its export (a heartbeat being written holds the row
    a moment: the sweeper skips it, and tries again)."""

    def requeued() -> bool:
        with session_scope(store.factory) as session:
            later = utcnow() + timedelta(seconds=10)
            export = exports.lock_stale_export(session, export_id=export_id, older_than=later)
            return (
                export is not None and exports.recover_stale_export(session, export=export, max_attempts=3) == "queued"
            )

    wait_for(requeued, timeout=10, what="the sweeper's re-queue")


@pytest.mark.parametrize("stale_merge", ["finishes", "fails"])
def test_a_run_that_lost_the_export_leaves_the_live_runs_archive_alone(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, stale_merge: str
) -> None:
    """The stale run goes silent mid-merge; the sweeper re-queues the export and a live run makes and records it;
    then the stale run's merge ends (or fails). It must neither overwrite nor delete the live archive, and it
    records nothing; its own files go."""
    job_id, export_id = _with_adapter_folder(store)
    live_merge = _merge_writing(b"live" * 1000)

    def stale(**kwargs: Any) -> None:
        _requeue(store, export_id)
        with monkeypatch.context() as inner:
            inner.setattr(export_task, "export_merged", live_merge)
            assert run_export(export_id, session_factory=store.factory, settings=store.settings, worker="live") == (
                "succeeded"
            )
        if stale_merge == "fails":
            raise RuntimeError("the stale run's merge failed late")
        _merge_writing(b"stale" * 1000)(**kwargs)

    monkeypatch.setattr(export_task, "export_merged", stale)
    assert run_export(export_id, session_factory=store.factory, settings=store.settings, worker="stale") is None

    export = _export(store, export_id)
    assert (export.status, export.worker, export.attempts) == ("succeeded", "live", 2)
    live_archive = store.artifacts.export_archive(job_id, export_id, 2)
    assert export.path == str(live_archive) and export.sha256 == file_sha256(live_archive)
    with tarfile.open(live_archive) as bundle:
        member = bundle.extractfile("model.safetensors")
        assert member is not None and member.read() == b"live" * 1000
    assert not store.artifacts.export_attempt_dir(job_id, export_id, 1).exists()  # the stale run's own files went


def test_the_outcome_is_recorded_through_a_job_store_outage(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final write is retried with backoff while the job store is unreachable, as a job's outcome is."""
    job_id, export_id = _with_adapter_folder(store)
    monkeypatch.setattr(export_task, "export_merged", _merge_writing(b"merged"))
    lock_owned, calls = exports.lock_owned_export, []

    def unreachable_twice(session: Any, **kwargs: Any) -> Export | None:
        calls.append(kwargs)
        if len(calls) <= 2:
            raise OperationalError("SELECT ... FOR UPDATE", {}, ConnectionRefusedError("connection refused"))
        return lock_owned(session, **kwargs)

    monkeypatch.setattr(exports, "lock_owned_export", unreachable_twice)
    assert run_export(export_id, session_factory=store.factory, settings=store.settings, worker="w") == "succeeded"
    assert len(calls) == 3
    export = _export(store, export_id)
    assert export.status == "succeeded" and export.sha256 == file_sha256(
        store.artifacts.export_archive(job_id, export_id, 1)
    )
