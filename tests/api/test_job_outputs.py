"""Events (JSON pages and the live SSE stream), metric series, checkpoints and the adapter download. The worker's
side is played through ``jobstore.repository``, as the worker writes it."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository
from jobstore.artifacts import ArtifactStore
from jobstore.db import session_scope
from jobstore.states import ErrorKind
from tests.api.conftest import ApiServer, assert_error


def _new_job(client: httpx.Client, dataset: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset["id"]})
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def _add_events(db: sessionmaker[Session], job_id: str, count: int, start: int = 0) -> None:
    with session_scope(db) as session:
        events = [("log", f"message {start + i}", {"i": start + i}) for i in range(count)]
        repository.add_events(session, job_id=job_id, events=events)


def test_events_json_pages(client1: httpx.Client, dataset1: dict[str, Any], db: sessionmaker[Session]) -> None:
    job = _new_job(client1, dataset1)
    _add_events(db, job["id"], 4)
    first = client1.get(f"/jobs/{job['id']}/events", params={"limit": 2}).json()
    assert [event["seq"] for event in first["data"]] == [1, 2]
    assert first["data"][0]["type"] == "status" and first["data"][0]["data"] == {"status": "queued"}
    assert first["has_more"] is True and first["next_cursor"] == "2"
    second = client1.get(f"/jobs/{job['id']}/events", params={"after": 2, "limit": 2}).json()
    assert [(event["seq"], event["message"]) for event in second["data"]] == [(3, "message 1"), (4, "message 2")]
    last = client1.get(f"/jobs/{job['id']}/events", params={"after": 4}).json()
    assert [event["seq"] for event in last["data"]] == [5] and last["has_more"] is False
    assert last["data"][0]["created_at"].endswith("Z")
    assert assert_error(client1.get(f"/jobs/{job['id']}/events", params={"after": -1}), 422)["param"] == "after"


def _read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    """Parse an SSE stream into events until the server ends it (comment lines, i.e. pings, are skipped)."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if current:
                events.append(current)
                current = {}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        current[field] = value.removeprefix(" ")
    if current:
        events.append(current)
    return events


def test_events_stream_live_over_sse(
    client1: httpx.Client, dataset1: dict[str, Any], db: sessionmaker[Session]
) -> None:
    job = _new_job(client1, dataset1)
    _add_events(db, job["id"], 2)  # seq 2, 3

    def worker() -> None:  # what a worker does while the client is watching
        time.sleep(0.8)
        _add_events(db, job["id"], 2, start=2)  # seq 4, 5
        time.sleep(0.6)
        with session_scope(db) as session:
            row = repository.get_job(session, job_id=job["id"])
            assert row is not None
            repository.set_status(
                session, job=row, status="failed", error_kind=ErrorKind.user_error, error_message="bad data"
            )  # seq 6

    thread = threading.Thread(target=worker)
    started = time.monotonic()
    thread.start()
    headers = {"Accept": "text/event-stream", "Last-Event-ID": "2"}
    with client1.stream("GET", f"/jobs/{job['id']}/events", headers=headers, timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _read_sse(response)  # returns when the server ends the stream
    thread.join()
    assert time.monotonic() - started < 10
    assert [event["id"] for event in events] == ["3", "4", "5", "6"]
    assert [event["event"] for event in events] == ["log", "log", "log", "status"]
    payloads = [json.loads(event["data"]) for event in events]
    assert [payload["seq"] for payload in payloads] == [3, 4, 5, 6]
    assert payloads[-1]["data"] == {"status": "failed", "error": {"kind": "user_error", "message": "bad data"}}

    # A finished job's stream replays what is left after ?after= and ends at once.
    with client1.stream("GET", f"/jobs/{job['id']}/events?after=4", headers={"Accept": "text/event-stream"}) as again:
        assert [event["id"] for event in _read_sse(again)] == ["5", "6"]
    failed = client1.get(f"/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"] == {"kind": "user_error", "message": "bad data"}
    bad_resume = client1.get(f"/jobs/{job['id']}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "x"})
    assert assert_error(bad_resume, 422)["param"] == "Last-Event-ID"


def test_metrics_series(client1: httpx.Client, dataset1: dict[str, Any], db: sessionmaker[Session]) -> None:
    job = _new_job(client1, dataset1)
    with session_scope(db) as session:
        points = [(2, "loss", 0.6), (1, "loss", 0.7), (1, "reward_margin", 0.1), (2, "reward_margin", 0.3)]
        repository.add_metrics(session, job_id=job["id"], points=[*points, (1, "learning_rate", 1e-5)])
    response = client1.get(f"/jobs/{job['id']}/metrics", params={"keys": "loss,reward_margin"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "job_id": job["id"],
        "series": {"loss": [[1, 0.7], [2, 0.6]], "reward_margin": [[1, 0.1], [2, 0.3]]},
    }
    everything = client1.get(f"/jobs/{job['id']}/metrics").json()["series"]
    assert set(everything) == {"loss", "reward_margin", "learning_rate"}


def test_checkpoints(client1: httpx.Client, dataset1: dict[str, Any], db: sessionmaker[Session]) -> None:
    job = _new_job(client1, dataset1)
    assert client1.get(f"/jobs/{job['id']}/checkpoints").json() == {"data": [], "has_more": False, "next_cursor": None}
    with session_scope(db) as session:
        for step in (100, 50):
            repository.add_checkpoint(session, job_id=job["id"], step=step, path=f"/somewhere/step-{step}")
    page = client1.get(f"/jobs/{job['id']}/checkpoints").json()
    assert [item["step"] for item in page["data"]] == [50, 100]
    assert all(item["id"].startswith("ckpt_") and item["job_id"] == job["id"] for item in page["data"])
    assert "path" not in page["data"][0]  # where workers keep files is not the client's business


def test_adapter_download(
    client1: httpx.Client, dataset1: dict[str, Any], db: sessionmaker[Session], api_server: ApiServer
) -> None:
    job = _new_job(client1, dataset1)
    assert_error(client1.get(f"/jobs/{job['id']}/adapter"), 409, "adapter_not_ready")

    # The worker's side: run the job, write the archive and its Artifact row, succeed.
    archive_path = ArtifactStore(api_server.artifacts).adapter_archive(job["id"])
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        config = json.dumps({"peft_type": "LORA", "r": 16}).encode()
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(config)
        archive.addfile(info, io.BytesIO(config))
    archive_path.write_bytes(buffer.getvalue())
    sha256 = hashlib.sha256(buffer.getvalue()).hexdigest()
    with session_scope(db) as session:
        running = repository.claim_job(session, job_id=job["id"], worker="test-worker")
        assert running is not None
        assert_error(client1.get(f"/jobs/{job['id']}/adapter"), 409, "adapter_not_ready")
        repository.add_artifact(
            session,
            tenant_id=running.tenant_id,
            job_id=job["id"],
            kind="adapter",
            path=str(archive_path),
            size_bytes=archive_path.stat().st_size,
            sha256=sha256,
        )
        repository.set_status(session, job=running, status="succeeded", result={"train/loss": 0.41})

    done = client1.get(f"/jobs/{job['id']}").json()
    assert (done["status"], done["progress"], done["percent"], done["result"]) == (
        "succeeded",
        1.0,
        100.0,
        {"train/loss": 0.41},
    )
    assert done["attempts"] == 1 and done["started_at"] and done["finished_at"]
    response = client1.get(f"/jobs/{job['id']}/adapter")
    assert response.status_code == 200, response.text
    assert response.content == buffer.getvalue()
    assert response.headers["X-Content-SHA256"] == sha256
    assert response.headers["Repr-Digest"].startswith("sha-256=:")
    assert "attachment" in response.headers["Content-Disposition"]
    assert f"{job['id']}-adapter.tar.gz" in response.headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        assert archive.getnames() == ["adapter_config.json"]


def test_checkpoint_adapter_download_with_ranges(
    client1: httpx.Client,
    client2: httpx.Client,
    dataset1: dict[str, Any],
    db: sessionmaker[Session],
    api_server: ApiServer,
) -> None:
    job = _new_job(client1, dataset1)
    store = ArtifactStore(api_server.artifacts)
    # What the engine writes: checkpoints/step-N/adapter/ beside the training state.
    checkpoint = store.run_dir(job["id"]) / "checkpoints" / "step-000003"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    weights = bytes(range(256)) * 64
    (checkpoint / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    (checkpoint / "optimizer.pt").write_bytes(b"not part of the adapter")
    outside = api_server.artifacts / "elsewhere" / "step-000004"
    (outside / "adapter").mkdir(parents=True)
    (outside / "adapter" / "adapter_config.json").write_text("{}")
    with session_scope(db) as session:
        repository.add_checkpoint(session, job_id=job["id"], step=3, path=str(checkpoint))
        repository.add_checkpoint(session, job_id=job["id"], step=4, path=str(outside))

    url = f"/jobs/{job['id']}/checkpoints/3/adapter"
    response = client1.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["X-Content-SHA256"] == hashlib.sha256(response.content).hexdigest()
    assert response.headers["accept-ranges"] == "bytes"
    assert f"{job['id']}-step3-adapter.tar.gz" in response.headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        assert sorted(archive.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
        member = archive.extractfile("adapter_model.safetensors")
        assert member is not None and member.read() == weights
    # Packed once: the second download is the same bytes, and a byte range is served from them.
    again = client1.get(url)
    assert again.content == response.content
    part = client1.get(url, headers={"Range": "bytes=10-29"})
    assert part.status_code == 206
    assert part.content == response.content[10:30]
    assert part.headers["content-range"] == f"bytes 10-29/{len(response.content)}"
    assert client1.get(url, headers={"Range": f"bytes={len(response.content) + 5}-"}).status_code == 416

    assert (
        assert_error(client1.get(f"/jobs/{job['id']}/checkpoints/7/adapter"), 404, "checkpoint_not_found")["param"]
        == "step"
    )
    # A stored path outside the job's run folder is never served.
    assert_error(client1.get(f"/jobs/{job['id']}/checkpoints/4/adapter"), 404, "checkpoint_not_found")
    assert_error(client2.get(url), 404)
    assert_error(client1.get(f"/jobs/{job['id']}/checkpoints/-1/adapter"), 422)
