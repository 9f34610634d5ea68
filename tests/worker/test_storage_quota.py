"""The worker's side of DAMA_TENANT_STORAGE_BYTES: a run does not start while the tenant's storage is full, every
run's files are measured into ``jobs.storage_bytes``, and a run whose files push the tenant over fails with a
user_error naming the setting, its files removed."""

from __future__ import annotations

import secrets

import pytest

from jobstore import quota, repository
from jobstore.db import session_scope
from tests.worker.conftest import JobStore, tiny_spec
from worker.tasks import run_job

QUEUE = "in-process"


@pytest.fixture
def tenant_store(store: JobStore) -> JobStore:
    """The worker tests' job store with a tenant of its own, so its storage is this test's alone."""
    with session_scope(store.factory) as session:
        tenant_id = repository.get_or_create_tenant(session, name=f"quota-{secrets.token_hex(4)}").id
    return JobStore(settings=store.settings, factory=store.factory, tenant_id=tenant_id)


def _used(store: JobStore) -> int:
    with session_scope(store.factory) as session:
        return quota.tenant_storage_bytes(session, tenant_id=store.tenant_id)


def _run(store: JobStore, job_id: str, quota_bytes: int | None) -> str | None:
    settings = store.settings.model_copy(update={"tenant_storage_bytes": quota_bytes})
    return run_job(job_id, session_factory=store.factory, settings=settings, worker="pytest:quota")


def test_a_run_does_not_start_while_the_storage_is_full(tenant_store: JobStore) -> None:
    job_id = tenant_store.create_job(tiny_spec(tenant_store.dataset(8)), queue=QUEUE)
    assert _run(tenant_store, job_id, quota_bytes=_used(tenant_store)) == "failed"
    job = tenant_store.job(job_id)
    assert job.error_kind == "user_error" and job.error_message is not None
    assert "DAMA_TENANT_STORAGE_BYTES" in job.error_message
    assert tenant_store.stages(job_id) == []  # refused before any stage ran


def test_runs_are_measured_and_one_over_the_quota_fails_with_its_files_removed(tenant_store: JobStore) -> None:
    dataset_id = tenant_store.dataset(8)
    spec = tiny_spec(dataset_id, max_steps=2, checkpoint_every=100, batch_size=4)
    first = tenant_store.create_job(spec, queue=QUEUE)
    assert _run(tenant_store, first, quota_bytes=None) == "succeeded"
    folder = tenant_store.artifacts.job_dir(first)
    assert tenant_store.job(first).storage_bytes == quota.folder_bytes(folder) > 0

    used = _used(tenant_store)
    second = tenant_store.create_job(spec, queue=QUEUE)
    assert _run(tenant_store, second, quota_bytes=used + 1000) == "failed"
    job = tenant_store.job(second)
    assert job.error_kind == "user_error" and job.error_message is not None
    assert "DAMA_TENANT_STORAGE_BYTES" in job.error_message and "removed" in job.error_message
    assert job.storage_bytes == 0 and not tenant_store.artifacts.job_dir(second).exists()
    with session_scope(tenant_store.factory) as session:
        assert repository.get_artifact(session, job_id=second, kind="adapter") is None
    assert _used(tenant_store) == used
