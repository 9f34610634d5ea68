"""Merged exports through the API: asking (only for a succeeded job, once per format), listing, following and
downloading (sha256, byte ranges). The worker's side is played through ``jobstore.exports`` as the worker writes
it; a real worker making a real merged model is in tests/e2e."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from jobstore import exports, repository
from jobstore.artifacts import ArtifactStore
from jobstore.db import session_scope
from tests.api.conftest import ApiServer, assert_error


def _succeeded_job(client: httpx.Client, dataset: dict[str, Any], db: sessionmaker[Session]) -> str:
    response = client.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset["id"], "queue": "nowhere"})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    assert_error(client.post(f"/jobs/{job_id}/exports", json={"format": "merged"}), 409, "job_not_succeeded")
    with session_scope(db) as session:
        job = repository.claim_job(session, job_id=job_id, worker="test-worker")
        assert job is not None
        repository.set_status(session, job=job, status="succeeded", result={})
    return job_id


def test_export_lifecycle_and_download(
    client1: httpx.Client,
    client2: httpx.Client,
    dataset1: dict[str, Any],
    db: sessionmaker[Session],
    api_server: ApiServer,
) -> None:
    job_id = _succeeded_job(client1, dataset1, db)
    assert client1.get(f"/jobs/{job_id}/exports").json()["data"] == []
    assert assert_error(client1.post(f"/jobs/{job_id}/exports", json={"format": "gguf"}), 422)["param"] == ("format")
    assert_error(client1.post(f"/jobs/{job_id}/exports", json={}), 422)

    asked = client1.post(f"/jobs/{job_id}/exports", json={"format": "merged"})
    assert asked.status_code == 202, asked.text
    export = asked.json()
    assert export["id"].startswith("exp_") and export["status"] == "queued" and export["sha256"] is None
    # Asking again while it is pending returns the same export: one merge per job and format.
    again = client1.post(f"/jobs/{job_id}/exports", json={"format": "merged"})
    assert again.status_code == 200 and again.json()["id"] == export["id"]
    url = f"/jobs/{job_id}/exports/{export['id']}"
    assert_error(client1.get(f"{url}/download"), 409, "export_not_ready")
    assert_error(client2.get(url), 404)
    assert_error(client2.post(f"/jobs/{job_id}/exports", json={"format": "merged"}), 404)
    assert assert_error(client1.get(f"/jobs/{job_id}/exports/exp_nope"), 404, "export_not_found")["param"] == (
        "export_id"
    )

    # The worker's side: claim, write the archive, record it.
    archive = ArtifactStore(api_server.artifacts).export_archive(job_id, export["id"], 1)
    archive.parent.mkdir(parents=True)
    content = bytes(range(256)) * 40
    archive.write_bytes(content)
    sha256 = hashlib.sha256(content).hexdigest()
    with session_scope(db) as session:
        claimed = exports.claim_export(session, export_id=export["id"], worker="w")
        assert claimed is not None
        assert exports.claim_export(session, export_id=export["id"], worker="other") is None  # exactly one worker
        exports.finish_export(session, export=claimed, path=str(archive), size_bytes=len(content), sha256=sha256)

    done = client1.get(url).json()
    assert (done["status"], done["size_bytes"], done["sha256"]) == ("succeeded", len(content), sha256)
    assert done["finished_at"].endswith("Z")
    assert [item["id"] for item in client1.get(f"/jobs/{job_id}/exports").json()["data"]] == [export["id"]]
    download = client1.get(f"{url}/download")
    assert download.status_code == 200 and download.content == content
    assert download.headers["X-Content-SHA256"] == sha256
    assert f"{job_id}-merged.tar" in download.headers["Content-Disposition"]
    part = client1.get(f"{url}/download", headers={"Range": "bytes=1000-1099"})
    assert part.status_code == 206 and part.content == content[1000:1100]
    assert part.headers["content-range"] == f"bytes 1000-1099/{len(content)}"


def test_a_failed_export_can_be_asked_for_again(
    client1: httpx.Client, dataset1: dict[str, Any], db: sessionmaker[Session]
) -> None:
    job_id = _succeeded_job(client1, dataset1, db)
    first = client1.post(f"/jobs/{job_id}/exports", json={"format": "merged"}).json()
    with session_scope(db) as session:
        claimed = exports.claim_export(session, export_id=first["id"], worker="w")
        assert claimed is not None
        exports.finish_export(session, export=claimed, error_message="RuntimeError: out of disk")
    failed = client1.get(f"/jobs/{job_id}/exports/{first['id']}").json()
    assert (failed["status"], failed["error_message"]) == ("failed", "RuntimeError: out of disk")
    assert_error(client1.get(f"/jobs/{job_id}/exports/{first['id']}/download"), 409, "export_not_ready")
    second = client1.post(f"/jobs/{job_id}/exports", json={"format": "merged"})
    assert second.status_code == 202 and second.json()["id"] != first["id"]


def test_init_adapter_is_checked_at_submission(
    client1: httpx.Client,
    client2: httpx.Client,
    dataset1: dict[str, Any],
    dataset2: dict[str, Any],
    db: sessionmaker[Session],
    api_server: ApiServer,
) -> None:
    def submit(client: httpx.Client, init_adapter: str, **spec: Any) -> httpx.Response:
        dataset = dataset1 if client is client1 else dataset2
        body = {"model": "dama/tiny-llava", "dataset_id": dataset["id"], "queue": "nowhere", **spec}
        return client.post("/jobs", json={**body, "init_adapter": init_adapter})

    source = client1.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset1["id"], "queue": "nowhere"})
    source_id = source.json()["id"]
    assert assert_error(submit(client1, "not-a-job"), 422)["param"] == "init_adapter"
    assert assert_error(submit(client1, "job_000000000000abcdef:5"), 404, "job_not_found")["param"] == "init_adapter"
    assert_error(submit(client2, f"{source_id}:5"), 404, "job_not_found")  # another tenant's job
    assert_error(submit(client1, source_id), 422, "init_adapter_not_ready")  # its final adapter: not yet
    assert_error(submit(client1, f"{source_id}:5"), 404, "checkpoint_not_found")
    assert_error(submit(client1, f"{source_id}:5", model="dama/tiny-qwen2-vl"), 422, "init_adapter_mismatch")

    # A kept checkpoint with its adapter on the store: accepted while the source still runs.
    checkpoint = ArtifactStore(api_server.artifacts).run_dir(source_id) / "checkpoints" / "step-000005"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_config.json").write_text("{}")
    with session_scope(db) as session:
        repository.add_checkpoint(session, job_id=source_id, step=5, path=str(checkpoint))
    created = submit(client1, f"{source_id}:5")
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["init_adapter"] == f"{source_id}:5"
    assert_error(submit(client1, f"{source_id}:5", lora={"enabled": False}), 422, "init_adapter_mismatch")


def test_an_unknown_tracking_target_is_refused_naming_it(client1: httpx.Client, dataset1: dict[str, Any]) -> None:
    body = {
        "model": "dama/tiny-llava",
        "dataset_id": dataset1["id"],
        "queue": "nowhere",
        "integrations": [{"target": "team-mlflow", "experiment": "a"}],
    }
    error = assert_error(client1.post("/jobs", json=body), 400, "unknown_tracking_target")
    assert error["param"] == "integrations[0].target"
    # A URI of the job's own is not a field at all.
    body["integrations"] = [{"target": "x", "tracking_uri": "http://attacker.example"}]
    assert assert_error(client1.post("/jobs", json=body), 422)["param"] == "integrations[0].tracking_uri"


def test_an_export_stays_queued_when_the_broker_is_down(
    client1: httpx.Client,
    limited_server: ApiServer,
    key1: str,
    dataset1: dict[str, Any],
    db: sessionmaker[Session],
) -> None:
    """As a job does (tests/api/test_jobs.py): the row is committed, the message cannot be sent, the request still
    succeeds and the export waits, queued, for the sweeper to send it."""
    job_id = _succeeded_job(client1, dataset1, db)
    with limited_server.client(key1) as client:  # the same database, a broker port with nothing listening
        response = client.post(f"/jobs/{job_id}/exports", json={"format": "merged"})
        assert response.status_code == 202, response.text
        export = response.json()
        assert export["status"] == "queued"
        assert client.get(f"/jobs/{job_id}/exports/{export['id']}").json()["status"] == "queued"
