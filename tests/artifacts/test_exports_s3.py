"""Issue 15's artifacts on the S3 backend (moto): a checkpoint adapter the API packs from the checkpoint's files
in the store, a merged export a real export task makes from the published adapter (the worker's scratch folder
emptied first), and an init_adapter copy made on a worker with an empty scratch folder. The worker's and the API's
stores have separate local folders, as on separate machines."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from api.app import create_app
from jobstore import exports, repository
from jobstore.artifacts import S3Store, open_store
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.settings import Settings
from jobstore.spec import JobSpec
from tests.api.conftest import PEPPER, create_key
from tests.artifacts.conftest import S3Server
from tests.e2e.test_service_e2e import _dataset_zip
from worker.engine_config import ensure_tiny_model, model_cache_root, starting_adapter
from worker.exports import run_export


def _checkpoint(worker: S3Store, job_id: str, step: int, weights: bytes) -> Path:
    """What the engine writes and the worker publishes: the training state and the adapter/ folder."""
    checkpoint = worker.run_dir(job_id) / "checkpoints" / f"step-{step:06d}"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (checkpoint / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    (checkpoint / "state.json").write_text(json.dumps({"step": step}))
    worker.publish_checkpoint(checkpoint)
    return checkpoint


def _adapter(folder: Path, settings: Settings) -> Path:
    """A LoRA adapter of the tiny LLaVA, as a succeeded job leaves it in its run folder."""
    base = AutoModelForImageTextToText.from_pretrained(ensure_tiny_model("llava", model_cache_root(settings)))
    torch.manual_seed(0)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(folder)
    return folder


def test_checkpoint_adapters_exports_and_init_adapters_on_s3(pg_url: str, s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    settings = Settings(
        home=tmp_path / "home",
        database_url=pg_url,
        broker_url="redis://127.0.0.1:6379/9",
        api_key_pepper=PEPPER,
        artifacts_url=f"s3://{bucket}/dama",
        s3_endpoint_url=s3_server.endpoint_url,
    )
    engine = make_engine(pg_url)
    db = make_session_factory(engine)
    headers = {"Authorization": f"Bearer {create_key(db, 's3-exports')}"}
    worker_settings = settings.model_copy(update={"scratch_dir": tmp_path / "worker-scratch"})
    worker = open_store(worker_settings, local_root=worker_settings.resolved_scratch_dir)
    assert isinstance(worker, S3Store)
    archive_zip, _ = _dataset_zip(tmp_path / "data", n_train=4, n_eval=0)
    app = create_app(settings)
    with TestClient(app) as client:
        uploaded = client.post(
            "/datasets", files={"file": ("train.zip", archive_zip, "application/zip")}, headers=headers
        )
        assert uploaded.status_code == 201, uploaded.text
        body = {"model": "dama/tiny-llava", "dataset_id": uploaded.json()["id"], "queue": "nowhere"}
        job = client.post("/jobs", json=body, headers=headers)
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]

        weights = bytes(range(256)) * 64
        checkpoint = _checkpoint(worker, job_id, 3, weights)
        with session_scope(db) as session:
            repository.add_checkpoint(session, job_id=job_id, step=3, path=worker.recorded_path(checkpoint))

        # The API has no copy of the checkpoint: it fetches the adapter/ folder, packs and publishes the archive.
        url = f"/jobs/{job_id}/checkpoints/3/adapter"
        response = client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["X-Content-SHA256"] == hashlib.sha256(response.content).hexdigest()
        with tarfile.open(fileobj=io.BytesIO(response.content)) as packed:
            assert sorted(packed.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
            member = packed.extractfile("adapter_model.safetensors")
            assert member is not None and member.read() == weights
        keys = s3_server.keys(bucket)
        assert keys[f"dama/jobs/{job_id}/checkpoint-adapters/step-000003-adapter.tar.gz"] == len(response.content)
        assert f"dama/jobs/{job_id}/run/checkpoints/step-000003/adapter/adapter_config.json" in keys
        assert not list(app.state.services.artifacts.root.rglob("adapter_model.safetensors")), "no copy kept"
        part = client.get(url, headers={**headers, "Range": "bytes=10-29"})
        assert part.status_code == 206 and part.content == response.content[10:30]

        # A merged export as the worker records it: published, its row naming the object.
        export = client.post(f"/jobs/{job_id}/exports", json={"format": "merged"}, headers=headers)
        assert export.status_code == 409  # the job has not succeeded
        with session_scope(db) as session:
            claimed = repository.claim_job(session, job_id=job_id, worker="w")
            assert claimed is not None
            repository.set_status(session, job=claimed, status="succeeded", result={})
        export = client.post(f"/jobs/{job_id}/exports", json={"format": "merged"}, headers=headers)
        assert export.status_code == 202, export.text
        export_id = export.json()["id"]
        # The worker makes it for real, from the adapter the job published, in a scratch folder of its own.
        adapter = _adapter(worker.run_dir(job_id) / "adapter", worker_settings)
        worker.publish(adapter)
        shutil.rmtree(worker.root)
        assert run_export(export_id, session_factory=db, settings=worker_settings, worker="w1") == "succeeded"
        with session_scope(db) as session:  # the row names the object, never a worker's local path
            stored = exports.get_export(session, export_id=export_id)
            assert stored is not None and stored.sha256 is not None
            key = f"dama/jobs/{job_id}/exports/{export_id}/attempt-1/model.tar"
            assert stored.path == f"s3://{bucket}/{key}" and s3_server.keys(bucket)[key] == stored.size_bytes
            sha256 = stored.sha256
        download_url = f"/jobs/{job_id}/exports/{export_id}/download"
        download = client.get(download_url, headers=headers)
        assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == sha256
        assert download.headers["X-Content-SHA256"] == sha256
        with tarfile.open(fileobj=io.BytesIO(download.content)) as bundle:
            assert {"config.json", "model.safetensors", "README.md"} <= set(bundle.getnames())
        ranged = client.get(download_url, headers={**headers, "Range": "bytes=1000-1099"})
        assert ranged.status_code == 206 and ranged.content == download.content[1000:1100]
    engine.dispose()

    # init_adapter on a worker whose scratch folder holds nothing: the source checkpoint's adapter comes from the
    # store, and the copy is published for a resumed attempt elsewhere.
    fresh = open_store(settings, local_root=tmp_path / "other-worker")
    spec = JobSpec.model_validate({"model": "dama/tiny-llava", "dataset_id": "ds_x", "init_adapter": f"{job_id}:3"})
    target = starting_adapter(spec, job_id="job_child", store=fresh)
    assert (target / "adapter_model.safetensors").read_bytes() == weights
    assert "dama/jobs/job_child/init_adapter/adapter_config.json" in s3_server.keys(bucket)
