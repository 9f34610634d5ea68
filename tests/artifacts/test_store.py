"""The S3 backend against a real S3-compatible server (moto), the download routes' two modes, and the scratch
folder's eviction rule."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient

from api.downloads import artifact_response
from api.errors import install_error_handlers
from jobstore.artifacts import MANIFEST, FilesystemStore, S3Store, open_store
from jobstore.settings import Settings
from tests.artifacts.conftest import S3Server
from worker.scratch import Scratch


@pytest.fixture
def store(s3_server: S3Server, tmp_path: Path) -> S3Store:
    bucket = s3_server.new_bucket()
    settings = Settings(
        home=tmp_path / "home",
        artifacts_url=f"s3://{bucket}/tenant-data",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_public_endpoint_url="https://files.example.org:9443",
        presign_expiry_s=600,
    )
    opened = open_store(settings, local_root=tmp_path / "local")
    assert isinstance(opened, S3Store)
    return opened


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _other_machine(store: S3Store, root: Path) -> S3Store:
    """The same store seen from another process, with an empty local folder."""
    other = S3Store(root, url=f"s3://{store.bucket}/{store.prefix}", endpoint_url=store.client.meta.endpoint_url)
    return other


def test_folders_go_up_and_come_down_under_keys_that_mirror_the_layout(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    data = store.dataset_dir("ds_1") / "data"
    _write(data / "train.jsonl", b'{"a": 1}\n')
    _write(data / "images" / "x.png", b"\x89PNG" + b"0" * 100)
    store.publish(store.dataset_dir("ds_1"))
    assert s3_server.keys(store.bucket) == {
        "tenant-data/datasets/ds_1/data/images/x.png": 104,
        "tenant-data/datasets/ds_1/data/train.jsonl": 9,
    }
    assert store.size_bytes(store.dataset_dir("ds_1")) == 113
    assert store.recorded_path(data) == f"s3://{store.bucket}/tenant-data/datasets/ds_1/data"

    elsewhere = _other_machine(store, tmp_path / "elsewhere")
    assert elsewhere.local_path(store.recorded_path(data)) == elsewhere.dataset_dir("ds_1") / "data"
    assert elsewhere.fetch(elsewhere.dataset_dir("ds_1") / "data")
    assert (elsewhere.dataset_dir("ds_1") / "data" / "images" / "x.png").read_bytes() == b"\x89PNG" + b"0" * 100
    assert not elsewhere.fetch(elsewhere.dataset_dir("ds_missing"))

    elsewhere.remove_dataset("ds_1")
    assert s3_server.keys(store.bucket) == {} and not elsewhere.dataset_dir("ds_1").exists()


def _checkpoint(run: Path, step: int) -> Path:
    folder = run / "checkpoints" / f"step-{step:06d}"
    _write(folder / "trainable.safetensors", bytes(range(256)) * step)
    _write(folder / "state.json", json.dumps({"step": step}).encode())
    return folder


def elsewhere_checks(store: S3Store, tmp_path: Path, checkpoint: Path) -> bool:
    return _other_machine(store, tmp_path / "checker").checkpoint_stored(store.recorded_path(checkpoint))


def test_a_checkpoint_counts_only_once_its_manifest_is_stored(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    run = store.run_dir("job_1")
    _write(run / "metrics.jsonl", b'{"step": 2}\n')
    store.publish_checkpoint(_checkpoint(run, 2))
    newer = _checkpoint(run, 4)
    # A worker killed mid-upload: the files (even state.json) went up, the manifest did not.
    store.publish(newer)
    keys = s3_server.keys(store.bucket)
    assert "tenant-data/jobs/job_1/run/checkpoints/step-000004/state.json" in keys
    assert f"tenant-data/jobs/job_1/run/checkpoints/step-000002/{MANIFEST}" in keys
    assert f"tenant-data/jobs/job_1/run/checkpoints/step-000004/{MANIFEST}" not in keys

    # What a checkpoint row names, as any machine checks it: only the complete one counts.
    assert elsewhere_checks(store, tmp_path, run / "checkpoints" / "step-000002") is True
    assert elsewhere_checks(store, tmp_path, newer) is False

    elsewhere = _other_machine(store, tmp_path / "elsewhere")
    elsewhere.fetch_latest_checkpoint(elsewhere.run_dir("job_1"))
    local = elsewhere.run_dir("job_1")
    assert sorted(p.name for p in (local / "checkpoints").iterdir()) == ["step-000002"]
    assert (local / "checkpoints" / "step-000002" / "trainable.safetensors").read_bytes() == bytes(range(256)) * 2
    assert (local / "metrics.jsonl").read_bytes() == b'{"step": 2}\n'

    # Completed, and the engine pruned step 2 locally: the store follows (manifest first).
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000002")
    store.publish_checkpoint(newer)
    assert not [k for k in s3_server.keys(store.bucket) if "step-000002" in k]
    fresh = _other_machine(store, tmp_path / "fresh")
    fresh.fetch_latest_checkpoint(fresh.run_dir("job_1"))
    assert [p.name for p in (fresh.run_dir("job_1") / "checkpoints").iterdir()] == ["step-000004"]


def test_presigned_links_are_signed_for_the_public_endpoint_with_the_configured_lifetime(store: S3Store) -> None:
    archive = _write(store.adapter_archive("job_9"), b"adapter")
    store.publish(archive)
    url = urlsplit(store.presigned_url(archive, filename="job_9-adapter.tar.gz"))
    query = parse_qs(url.query)
    assert (url.scheme, url.netloc, url.path) == (
        "https",
        "files.example.org:9443",
        f"/{store.bucket}/tenant-data/jobs/job_9/adapter.tar.gz",
    )
    assert query["X-Amz-Expires"] == ["600"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"][0].startswith("dama-test/")
    assert "job_9-adapter.tar.gz" in query["response-content-disposition"][0]


def _download_app(store: S3Store | FilesystemStore, path: Path, mode: str) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/file")
    def download(request: Request) -> Response:
        return artifact_response(store, path, request=request, media_type="application/gzip", mode=mode)

    return TestClient(app, follow_redirects=False)


@pytest.mark.parametrize("backend", ["s3", "filesystem"])
def test_downloads_answer_range_requests(backend: str, store: S3Store, tmp_path: Path) -> None:
    content = bytes(range(256)) * 40
    served: S3Store | FilesystemStore = store if backend == "s3" else FilesystemStore(tmp_path / "fs")
    path = _write(served.adapter_archive("job_r"), content)
    served.publish(path)
    client = _download_app(served, path, "stream")
    whole = client.get("/file")
    assert whole.status_code == 200 and whole.content == content and whole.headers["accept-ranges"] == "bytes"
    part = client.get("/file", headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == content[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(content)}"
    tail = client.get("/file", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == content[-10:]
    refused = client.get("/file", headers={"Range": f"bytes={len(content)}-"})
    assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{len(content)}"


def test_redirect_mode_answers_307_to_a_presigned_link(store: S3Store) -> None:
    path = _write(store.adapter_archive("job_x"), b"x")
    store.publish(path)
    answer = _download_app(store, path, "redirect").get("/file")
    assert answer.status_code == 307
    assert answer.headers["location"].startswith(f"https://files.example.org:9443/{store.bucket}/")


def test_scratch_evicts_least_recently_used_entries_but_never_held_ones(tmp_path: Path) -> None:
    scratch = Scratch(tmp_path, max_bytes=2500)
    entries = {}
    for age, name in enumerate(["datasets/ds_old", "cache/ref-1.pt", "jobs/job_a", "models/dama-tiny"]):
        entry = tmp_path / name
        _write(entry / "blob" if "." not in entry.name else entry, b"0" * 1000)
        stamp = time.time() - 1000 + age * 100  # oldest first
        os.utime(entry, (stamp, stamp))
        entries[name] = entry
    # ds_old is the least recently used, but a running job (this process) holds it.
    with scratch.hold([entries["datasets/ds_old"]]):
        removed = scratch.evict()
    assert removed == [entries["cache/ref-1.pt"], entries["jobs/job_a"]]
    assert entries["datasets/ds_old"].exists() and entries["models/dama-tiny"].exists()
    # A hold left by a process that died lapses.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".holds").mkdir(exist_ok=True)
    (tmp_path / ".holds" / f"{dead.pid}-1.json").write_text(json.dumps([str(entries["datasets/ds_old"])]))
    # The job's hold marked ds_old used: now the model is the least recently used.
    assert Scratch(tmp_path, max_bytes=1500).evict() == [entries["models/dama-tiny"]]
    assert Scratch(tmp_path, max_bytes=500).evict() == [entries["datasets/ds_old"]]
    assert not list((tmp_path / ".holds").iterdir())


def test_an_unreachable_store_answers_503_not_500(pg_url: str, s3_server: S3Server, tmp_path: Path) -> None:
    from api.app import create_app
    from jobstore.db import make_engine, make_session_factory
    from tests.api.conftest import PEPPER, create_key
    from tests.e2e.test_service_e2e import _dataset_zip

    settings = Settings(
        home=tmp_path / "home",
        database_url=pg_url,
        broker_url="redis://127.0.0.1:6379/9",
        api_key_pepper=PEPPER,
        artifacts_url="s3://no-such-bucket/dama",  # moto answers NoSuchBucket, as a misconfigured store would
        s3_endpoint_url=s3_server.endpoint_url,
    )
    engine = make_engine(pg_url)
    key = create_key(make_session_factory(engine), "store-down")
    engine.dispose()
    archive, _ = _dataset_zip(tmp_path / "data", n_train=4, n_eval=0)
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post(
            "/datasets",
            files={"file": ("train.zip", archive, "application/zip")},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "artifact_store_unavailable" and answer.headers["retry-after"] == "30"
    local = app.state.services.artifacts.root
    assert not list(local.rglob("train.jsonl")), "the refused upload's files were removed"
