"""The client against the whole service (uvicorn, a Celery worker, Postgres, Redis): upload, create, follow to
success, download (sha256 checked) and load the adapter with peft, once through the ``dama`` commands and once
through the SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from dama_client import Client, DamaError
from tests.e2e.test_service_e2e import _dataset_zip, _free_port, service  # the same fixture, one per module

__all__ = ["service"]

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("learning_rate=5e-3", "batch_size=8", "epochs=2")


def _load_adapter(service: dict[str, Any], adapter_dir: Path) -> None:
    base_dir = next(p.parent for p in service["models"].rglob("config.json") if "llava" in p.read_text())
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits).all()


def test_cli_session_from_upload_to_a_loaded_adapter(service: dict[str, Any], tmp_path: Path) -> None:
    env = {**os.environ, "DAMA_API_URL": service["url"], "DAMA_API_KEY": service["key"]}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    def dama(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )
        print(f"$ dama {' '.join(args)}\n{result.stdout}{result.stderr[-2000:]}")  # the session, in the log
        return result

    train_zip, _ = _dataset_zip(tmp_path / "data", n_train=16, n_eval=0)
    (tmp_path / "train.zip").write_bytes(train_zip)
    uploaded = dama("datasets", "upload", str(tmp_path / "train.zip"), "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    dataset = json.loads(uploaded.stdout)
    assert dataset["row_count"] == 16

    sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
    args = ["--model", "dama/tiny-llava", "--dataset", dataset["id"], "--method", "dama", *sets]
    followed = dama("jobs", "create", *args, "--follow")
    assert followed.returncode == 0, followed.stderr
    assert "status: succeeded" in followed.stdout
    assert "[stage] stage training" in followed.stderr and "4/4" in followed.stderr  # the bar reached the end
    assert "  loss: " in followed.stdout  # the final metrics
    job_id = followed.stderr.split("created ", 1)[1].split()[0]

    listed = json.loads(dama("jobs", "list", "--json").stdout)
    assert listed[0]["id"] == job_id and listed[0]["status"] == "succeeded"
    metrics = json.loads(dama("jobs", "metrics", job_id, "--json", "--keys", "loss").stdout)
    assert [step for step, _ in metrics["series"]["loss"]] == [1, 2, 3, 4]

    downloaded = dama("jobs", "download", job_id, "-o", str(tmp_path / "out"))
    assert downloaded.returncode == 0, downloaded.stderr
    adapter_dir = Path(downloaded.stdout.strip())
    assert (adapter_dir / "adapter_config.json").is_file() and tmp_path / "out" in adapter_dir.parents
    _load_adapter(service, adapter_dir)

    missing = dama("jobs", "download", "job_nope")
    assert missing.returncode == 1 and "job_nope" in missing.stderr


def test_sdk_session_from_upload_to_a_loaded_adapter(service: dict[str, Any], tmp_path: Path) -> None:
    train_zip, _ = _dataset_zip(tmp_path / "data", n_train=16, n_eval=0)
    (tmp_path / "train.zip").write_bytes(train_zip)
    with Client(service["url"], service["key"]) as client:
        dataset = client.datasets.upload(tmp_path / "train.zip")
        hyperparameters = {"learning_rate": 5e-3, "batch_size": 8, "epochs": 2, "checkpoint_every": 2}
        job = client.jobs.create(
            model="dama/tiny-llava", dataset_id=dataset.id, method="dama", hyperparameters=hyperparameters
        )
        updates = list(client.jobs.follow(job.id, interval=0.5))
        final = updates[-1].job
        assert final.status == "succeeded" and final.step == final.total_steps == 4, final
        streamed = [event for update in updates for event in update.events]
        assert [event.seq for event in streamed] == list(range(1, len(streamed) + 1))
        assert [event.seq for event in client.jobs.events(job.id, limit=2)] == [e.seq for e in streamed]
        assert "training" in {event.data.get("stage") for event in streamed if event.type == "stage" and event.data}

        adapter_dir = client.jobs.download(job.id, tmp_path / "adapter")
        _load_adapter(service, adapter_dir)
        steps = [checkpoint.step for checkpoint in client.jobs.checkpoints(job.id)]
        assert steps and steps[-1] <= 4
        _load_adapter(service, client.jobs.download_checkpoint(job.id, steps[-1], tmp_path / "checkpoint"))


def test_serve_takes_host_and_port(tmp_path: Path) -> None:
    """`dama serve --host H --port P`, as `dama api` takes them (the environment stays the default)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DAMA_")}
    port = _free_port()
    env.update(DAMA_HOME=str(tmp_path / ".dama"), DAMA_API_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            with Client(f"http://127.0.0.1:{port}", max_retries=0, timeout=2) as client:
                while True:
                    try:
                        assert client.health.live().status == "ok"
                        break
                    except DamaError:
                        assert process.poll() is None and time.monotonic() < deadline, (
                            tmp_path / "serve.log"
                        ).read_text()
                        time.sleep(0.5)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
