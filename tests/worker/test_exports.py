"""The export task called as a plain function: it merges from the archive when the run folder is gone, a broken
adapter fails the export (never the job), and a duplicate message does nothing."""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from jobstore import exports, repository
from jobstore.artifacts import file_sha256, pack_folder
from jobstore.db import session_scope
from jobstore.models import Export
from tests.worker.conftest import JobStore, tiny_spec
from worker.engine_config import ensure_tiny_model, model_cache_root
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
    archive = store.artifacts.export_archive(job_id, export_id)
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
    assert not store.artifacts.export_archive(job_id, export_id).exists()
    assert store.job(job_id).status == "succeeded"
