"""Experiment tracking against a real MLflow tracking server (started here: sqlite backend, local artifact root, a
free loopback port, once per session) and W&B in offline mode (its run file read back): parameters, per-step
metrics, evaluation results and the adapter arrive in the tenant's namespace; a broken tracker does not fail the
job and an event says so."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobstore.settings import Settings
from jobstore.tracking import TrackingTarget
from tests.worker.conftest import JobStore, tiny_spec, wait_for
from worker.tasks import run_job

pytestmark = pytest.mark.slow
QUEUE = "in-process-tracking"
STEPS = 6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
        f"--default-artifact-root={root / 'artifacts'}",
        "--workers=1",
    ]
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, (root / "server.log").read_text()
        try:
            return httpx.get(f"{uri}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, timeout=180, interval=0.5, what="mlflow server")
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def _settings(store: JobStore, **targets: TrackingTarget) -> Settings:
    return store.settings.model_copy(update={"tracking_targets": targets})


def _wandb_records(run_dir: Path) -> list[Any]:
    """The records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    framed records (32 KiB blocks; 7-byte chunk headers: crc, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.rglob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        left_in_block = block - offset % block
        if left_in_block < 7:  # block trailer: padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full or last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_a_job_reports_to_mlflow_and_wandb(
    store: JobStore, mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = _settings(
        store,
        **{
            "team-mlflow": TrackingTarget(kind="mlflow", tracking_uri=mlflow_server),
            "team-wandb": TrackingTarget(kind="wandb", entity="team", project_prefix="dama-"),
        },
    )
    spec = tiny_spec(store.dataset(48), max_steps=STEPS, checkpoint_every=100)
    spec["evaluation"] = {"holdout_fraction": 0.125}
    spec["integrations"] = [
        {"target": "team-mlflow", "experiment": "sweep-1"},
        {"target": "team-wandb", "experiment": "sweep-1"},
    ]
    job_id = store.create_job(spec, queue=QUEUE)
    assert run_job(job_id, session_factory=store.factory, settings=settings, worker="pytest:1") == "succeeded"
    assert not [event for event in store.events(job_id) if event[0] == "tracking"]
    tenant = _tenant_name(store)

    # MLflow: one run in the tenant's experiment with the spec, every step's loss, evaluation and adapter.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(f"{tenant}/sweep-1")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == job_id and run.info.status == "FINISHED"
    assert run.data.params["method"] == "dama" and run.data.params["hyperparameters.max_steps"] == str(STEPS)
    assert [point.step for point in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, STEPS + 1))
    assert [point.step for point in client.get_metric_history(run.info.run_id, "eval_accuracy")] == [0, STEPS]
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "evaluation.json"} <= artifacts
    adapter_files = {item.path for item in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter_files
    evaluation = Path(client.download_artifacts(run.info.run_id, "evaluation.json", str(tmp_path)))
    assert json.loads(evaluation.read_text())["steps"] == STEPS

    # W&B (offline): the run file holds the run in project dama-<tenant>, its config, history and the adapter.
    records = _wandb_records(store.artifacts.job_dir(job_id) / "tracking")
    kinds = [record.WhichOneof("record_type") for record in records]
    (run_record,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert (run_record.project, run_record.entity, run_record.run_group) == (f"dama-{tenant}", "team", "sweep-1")
    assert run_record.display_name == job_id
    config = {item.key: item.value_json for item in run_record.config.update}
    assert config["method"] == '"dama"' and config["hyperparameters.max_steps"] == f'"{STEPS}"'
    loss_steps = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            keys = {item.key or ".".join(item.nested_key) for item in record.history.item}
            if "loss" in keys:
                loss_steps.append(record.history.step.num)
    assert loss_steps == list(range(1, STEPS + 1))
    summary_keys = {
        item.key or ".".join(item.nested_key)
        for record in records
        if record.WhichOneof("record_type") == "summary"
        for item in record.summary.update
    }
    assert "evaluation" in summary_keys
    assert "artifact" in kinds and "exit" in kinds


def test_a_broken_tracker_never_fails_the_job(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    settings = _settings(store, down=TrackingTarget(kind="mlflow", tracking_uri=dead))
    spec = tiny_spec(store.dataset(48), max_steps=3, checkpoint_every=100)
    spec["integrations"] = [{"target": "down", "experiment": "x"}]
    job_id = store.create_job(spec, queue=QUEUE)
    assert run_job(job_id, session_factory=store.factory, settings=settings, worker="pytest:1") == "succeeded"
    notes = [(message, data) for kind, message, data in store.events(job_id) if kind == "tracking"]
    assert len(notes) == 1, notes
    message, data = notes[0]
    assert message.startswith("tracking to down (mlflow) stopped:") and data is not None and data["tracker"]
    assert store.job(job_id).result is not None


def _tenant_name(store: JobStore) -> str:
    from jobstore.db import session_scope
    from jobstore.models import Tenant

    with session_scope(store.factory) as session:
        tenant = session.get(Tenant, store.tenant_id)
        assert tenant is not None
        return tenant.name
