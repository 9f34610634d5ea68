"""Two machines sharing only Postgres, Redis and an S3-compatible store (moto's server): no artifacts folder.

The API and two workers run as the compose commands (``dama api``, ``dama worker``), each with its own HOME,
TMPDIR and scratch folder. A dataset is uploaded, a job trains on the first worker, which is SIGKILLed once a
checkpoint is stored; the second worker, with an empty scratch folder, resumes the job from the stored checkpoint;
the adapter downloads through the API with its sha256 and loads with peft. The bucket is listed at the end.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from sqlalchemy import create_engine, text
from transformers import AutoModelForImageTextToText

from tests.artifacts.conftest import CREDENTIALS, S3Server, _free_port
from tests.e2e.test_service_e2e import _command, _dataset_zip, _stop

pytestmark = pytest.mark.slow
TOTAL_STEPS = 60


@dataclass
class Machine:
    name: str
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    def start(self, command: str) -> None:
        log = (self.root / f"{command}.log").open("wb")
        self.process = subprocess.Popen(
            _command(command), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self, command: str) -> str:
        return (self.root / f"{command}.log").read_text(errors="replace")[-6000:]


@dataclass
class Cluster:
    url: str
    database_url: str
    bucket: str
    s3: S3Server
    api: Machine
    workers: list[Machine]


def _machine(name: str, base: Path, shared: dict[str, str]) -> Machine:
    root = base / name
    for folder in ("home", "tmp", "scratch"):
        (root / folder).mkdir(parents=True)
    env = {
        **shared,
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "DAMA_HOME": str(root / "home" / ".dama"),
        "DAMA_SCRATCH_DIR": str(root / "scratch"),
    }
    return Machine(name, root, env)


@pytest.fixture(scope="module")
def cluster(
    pg_url: str, redis_url: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("machines")
    bucket = s3_server.new_bucket()
    port = _free_port()
    queue = f"s3-{secrets.token_hex(3)}"
    shared = {name: value for name, value in os.environ.items() if not name.startswith(("DAMA_", "AWS_"))}
    shared.update(CREDENTIALS)
    shared.update(
        {
            "DAMA_ENVIRONMENT": "production",
            "DAMA_DATABASE_URL": pg_url,
            "DAMA_BROKER_URL": redis_url,
            "DAMA_API_KEY_PEPPER": secrets.token_hex(16),
            "DAMA_ARTIFACTS_URL": f"s3://{bucket}/dama",
            "DAMA_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "DAMA_DEFAULT_QUEUE": queue,
            "DAMA_WORKER_QUEUES": queue,
            "DAMA_API_HOST": "127.0.0.1",
            "DAMA_API_PORT": str(port),
            "DAMA_METRICS_FLUSH_S": "0.2",
            "DAMA_HEARTBEAT_INTERVAL_S": "0.5",
            "DAMA_HEARTBEAT_TIMEOUT_S": "4",
            "DAMA_SWEEP_INTERVAL_S": "1",
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    api = _machine("api", base, shared)
    workers = [_machine(f"worker{n}", base, shared) for n in (1, 2)]
    subprocess.run(_command("migrate"), env=api.env, check=True, timeout=120)
    api.start("api")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, api.log("api")
        time.sleep(0.3)
    try:
        yield Cluster(url, pg_url, bucket, s3_server, api, workers)
    finally:
        for machine in (api, *workers):
            if machine.process is not None:
                _stop(machine.process)


def _client(cluster: Cluster) -> httpx.Client:
    key = subprocess.run(
        [*_command("migrate")[:1], "admin", "create-key", "--tenant", "two-machines"],
        env=cluster.api.env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _wait(predicate: Any, *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_job_moves_to_another_machine_through_the_store(cluster: Cluster, tmp_path: Path) -> None:
    client = _client(cluster)
    first, second = cluster.workers
    train_zip, _ = _dataset_zip(tmp_path / "data", n_train=16, n_eval=0)
    dataset = client.post("/datasets", files={"file": ("train.zip", train_zip, "application/zip")})
    assert dataset.status_code == 201, dataset.text
    dataset_id = dataset.json()["id"]
    assert client.get(f"/datasets/{dataset_id}/rows", params={"limit": 2}).status_code == 200  # preview from S3

    first.start("worker")
    spec = {
        "model": "dama/tiny-llava",
        "dataset_id": dataset_id,
        "method": "dama",
        "hyperparameters": {"batch_size": 4, "max_steps": TOTAL_STEPS, "checkpoint_every": 5, "learning_rate": 1e-2},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "train_projector": True},
    }
    job_id = client.post("/jobs", json=spec).json()["id"]
    # A registered checkpoint is already in the store (it is uploaded, manifest last, before it is registered).
    _wait(lambda: client.get(f"/jobs/{job_id}/checkpoints").json()["data"], timeout=180, what="a checkpoint")
    assert first.process is not None
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=30)
    killed = client.get(f"/jobs/{job_id}").json()
    assert killed["status"] == "running" and killed["step"] < TOTAL_STEPS, "the job finished before the kill"
    assert not any(second.scratch.iterdir()), "the second machine starts with an empty scratch folder"

    second.start("worker")  # its sweeper finds the silent job, re-queues it; it resumes it
    job = _wait(
        lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in ("succeeded", "failed", "cancelled") and j,
        timeout=240,
        what="the job to end on the second machine",
    )
    assert job["status"] == "succeeded", (job, second.log("worker"))
    assert job["attempts"] == 2
    events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    resumed = [event["data"]["step"] for event in events if event["type"] == "resumed"]
    assert resumed and 5 <= resumed[0] < TOTAL_STEPS and resumed[0] % 5 == 0, "it resumed, not restarted"
    training = [
        e["data"]["resumed_from_step"] for e in events if e["type"] == "stage" and e["data"]["stage"] == "training"
    ]
    assert training == [0, resumed[0]]
    print(f"\n{job_id}: worker1 SIGKILLed at step {killed['step']}; worker2 resumed from step {resumed[0]}")
    loss = client.get(f"/jobs/{job_id}/metrics", params={"keys": "loss"}).json()["series"]["loss"]
    assert [int(step) for step, _ in loss] == list(range(1, TOTAL_STEPS + 1))
    checkpoints = second.scratch / "jobs" / job_id / "run" / "checkpoints"
    assert checkpoints.is_dir() and (second.scratch / "datasets" / dataset_id / "data").is_dir()

    # The adapter streams through the API with its sha256, answers a Range request, and loads with peft.
    download = client.get(f"/jobs/{job_id}/adapter")
    assert download.status_code == 200, download.text
    sha256 = hashlib.sha256(download.content).hexdigest()
    assert sha256 == download.headers["X-Content-SHA256"] == job["result"]["adapter_sha256"]
    part = client.get(f"/jobs/{job_id}/adapter", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == download.content[:100]
    with tarfile.open(fileobj=io.BytesIO(download.content)) as bundle:
        bundle.extractall(tmp_path / "adapter", filter="data")
    adapter_dir = next(p.parent for p in (tmp_path / "adapter").rglob("adapter_config.json"))
    base_dir = next(p.parent for p in (second.scratch / "models").rglob("config.json") if "llava" in p.read_text())
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits).all()

    # Where everything went: the bucket, and no artifacts folder on any machine.
    keys = cluster.s3.keys(cluster.bucket)
    print(f"\ns3://{cluster.bucket}:")
    for key, size in sorted(keys.items()):
        print(f"  {size:>10}  {key}")
    assert f"dama/datasets/{dataset_id}/data/train.jsonl" in keys
    assert f"dama/datasets/{dataset_id}/preview/preview.json" in keys
    assert (
        f"dama/jobs/{job_id}/adapter.tar.gz" in keys and f"dama/jobs/{job_id}/run/adapter/adapter_config.json" in keys
    )
    manifests = [
        k for k in keys if k.startswith(f"dama/jobs/{job_id}/run/checkpoints/") and k.endswith("/MANIFEST.json")
    ]
    assert manifests and f"dama/jobs/{job_id}/run/metrics.jsonl" in keys
    # The tenant's storage counts what the store holds under the job's prefix (measured as the run ended).
    engine = create_engine(cluster.database_url)
    with engine.connect() as connection:
        stored = connection.scalar(text("SELECT storage_bytes FROM jobs WHERE id = :id"), {"id": job_id})
        registered = connection.scalars(text("SELECT path FROM checkpoints WHERE job_id = :id"), {"id": job_id}).all()
    engine.dispose()
    # Checkpoint rows name the store's objects (every machine knows them so), and only complete ones still kept.
    prefix = f"s3://{cluster.bucket}/"
    assert registered and all(path.startswith(prefix) for path in registered)
    assert sorted(path.removeprefix(prefix) + "/MANIFEST.json" for path in registered) == sorted(manifests)
    assert stored == sum(size for key, size in keys.items() if key.startswith(f"dama/jobs/{job_id}/"))
    for machine in (cluster.api, *cluster.workers):
        assert not [p for p in machine.root.rglob("*") if p.name == "artifacts"], machine.name
    assert not list(cluster.api.root.rglob("train.jsonl")), "the API keeps no copy of a stored dataset"
