"""Worker fixtures: real Postgres (``pg_url``), real Redis (``redis_url``), real Celery worker processes.

Jobs are made the way the API makes them: a dataset row plus its files in the artifact store (the demo's
coloured-shapes pairs, with per-row hardness so no CLIP scorer is needed), then ``create_job`` and, for the
worker tests, ``enqueue_job``. Every session has its own queue names (``<prefix>-<role>``), so runs never take
each other's messages; its Redis keys are deleted at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from dama_engine.proving.shapes import make_demo_dataset
from jobstore import repository
from jobstore.artifacts import ArtifactStore, FilesystemStore
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import Job
from jobstore.settings import Settings
from worker.engine_config import ensure_tiny_model, model_cache_root

ROOT = Path(__file__).resolve().parents[2]
QUEUE_PREFIX = f"dama-test-{secrets.token_hex(4)}"
WORKER_READY_S = 90.0

# Timings short enough that dead workers are noticed within seconds.
FAST = {
    "heartbeat_interval_s": 0.5,
    "heartbeat_timeout_s": 4.0,
    "sweep_interval_s": 1.0,
    "metrics_flush_s": 0.25,
    "max_attempts": 3,
}


def tiny_spec(dataset_id: str, **hyperparameters: Any) -> dict[str, Any]:
    """A DAMA job on the built-in tiny LLaVA: a few seconds on two CPU cores."""
    values = {"batch_size": 4, "max_steps": 30, "checkpoint_every": 10, "max_length": 256, "learning_rate": 1e-2}
    values.update(hyperparameters)
    return {
        "model": "dama/tiny-llava",
        "dataset_id": dataset_id,
        "method": "dama",
        "hyperparameters": values,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "train_projector": True},
    }


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")


@dataclass
class JobStore:
    """The test's handle on the job store: settings, sessions, the tenant, and helpers to make jobs."""

    settings: Settings
    factory: sessionmaker[Session]
    tenant_id: str
    datasets: dict[int, str] = field(default_factory=dict)

    @property
    def artifacts(self) -> ArtifactStore:
        return FilesystemStore(self.settings.resolved_artifacts_dir)

    def dataset(self, rows: int = 48) -> str:
        """A demo dataset of ``rows`` pairs (files + row), made once per size."""
        if rows in self.datasets:
            return self.datasets[rows]
        dataset_id = f"ds_test{secrets.token_hex(8)}"
        folder = self.artifacts.dataset_dir(dataset_id) / "data"
        demo = make_demo_dataset(
            folder, n_train=rows, n_eval=0, n_generative=0, seed=len(self.datasets), with_hardness=True
        )
        # The folder holds one data file, as the API unpacks an upload: the pairs and their images.
        for extra in (demo.eval, demo.generative_eval, demo.vocabulary):
            extra.unlink()
        with session_scope(self.factory) as session:
            repository.create_dataset(
                session,
                dataset_id=dataset_id,
                tenant_id=self.tenant_id,
                name=f"demo-{rows}",
                format="trl",
                row_count=rows,
                image_count=rows,
                size_bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                sha256="0" * 64,
                path=str(folder),
                report={"ok": True},
            )
        self.datasets[rows] = dataset_id
        return dataset_id

    def create_job(self, spec: dict[str, Any], *, queue: str) -> str:
        with session_scope(self.factory) as session:
            job = repository.create_job(
                session, tenant_id=self.tenant_id, spec=spec, dataset_id=spec["dataset_id"], queue=queue
            )
            return job.id

    def job(self, job_id: str) -> Job:
        with session_scope(self.factory) as session:
            job = repository.get_job(session, job_id=job_id)
            assert job is not None
            return job

    def events(self, job_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
        with session_scope(self.factory) as session:
            rows, _ = repository.list_events(session, job_id=job_id, after_seq=0, limit=10_000)
            return [(row.type, row.message, row.data) for row in rows]

    def stages(self, job_id: str) -> list[str]:
        return [data["stage"] for kind, _, data in self.events(job_id) if kind == "stage" and data]

    def metric_series(self, job_id: str) -> dict[str, list[list[float]]]:
        with session_scope(self.factory) as session:
            return repository.metric_series(session, job_id=job_id)

    def checkpoint_steps(self, job_id: str) -> list[int]:
        with session_scope(self.factory) as session:
            return [row.step for row in repository.list_checkpoints(session, job_id=job_id)]


@pytest.fixture(scope="session")
def worker_settings(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("dama-home")
    return Settings(
        home=home,
        database_url=pg_url,
        broker_url=redis_url,
        artifacts_dir=home / "artifacts",
        model_cache_dir=home / "models",
        default_queue=f"{QUEUE_PREFIX}-default",
        **FAST,
    )


@pytest.fixture(scope="session")
def store(worker_settings: Settings) -> Iterator[JobStore]:
    engine = make_engine(worker_settings.resolved_database_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        tenant = repository.get_or_create_tenant(session, name=f"worker-tests-{secrets.token_hex(4)}")
        tenant_id = tenant.id
    # Build the tiny model once, before any timing-sensitive test: workers then find it in the cache.
    ensure_tiny_model("llava", model_cache_root(worker_settings))
    yield JobStore(settings=worker_settings, factory=factory, tenant_id=tenant_id)
    engine.dispose()


@pytest.fixture(scope="session", autouse=True)
def _clean_redis(redis_url: str) -> Iterator[None]:
    yield
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{QUEUE_PREFIX}*"):
        client.delete(key)


def worker_env(settings: Settings, queue: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DAMA_HOME": str(settings.home),
            "DAMA_DATABASE_URL": settings.resolved_database_url,
            "DAMA_BROKER_URL": settings.resolved_broker_url,
            "DAMA_ARTIFACTS_DIR": str(settings.resolved_artifacts_dir),
            "DAMA_MODEL_CACHE_DIR": str(settings.model_cache_dir),
            "DAMA_DEFAULT_QUEUE": queue,
            "DAMA_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "DAMA_HEARTBEAT_TIMEOUT_S": str(settings.heartbeat_timeout_s),
            "DAMA_SWEEP_INTERVAL_S": str(settings.sweep_interval_s),
            "DAMA_METRICS_FLUSH_S": str(settings.metrics_flush_s),
            "DAMA_MAX_ATTEMPTS": str(settings.max_attempts),
            "DAMA_WEBHOOK_ALLOWED_HOSTS": settings.webhook_allowed_hosts,
            "DAMA_WEBHOOK_RETRY_SCHEDULE_S": settings.webhook_retry_schedule_s,
            "DAMA_WEBHOOK_POLL_S": str(settings.webhook_poll_s),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
    )
    return env


class WorkerProcess:
    """``celery -A worker.celery_app worker -Q <queue> --pool solo --concurrency 1`` as a child process
    (``app``: another worker module, e.g. ``benchmarks.fake_engine``; ``env``: extra environment)."""

    def __init__(
        self,
        settings: Settings,
        queue: str,
        log_dir: Path,
        name: str,
        *,
        app: str = "worker.celery_app",
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_file = log_dir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-Q",
            queue,
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=worker_env(settings, queue) | (env or {}),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, timeout=WORKER_READY_S, interval=0.2, what=f"worker {name} to start")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the worker exited with {self.process.returncode}:\n{self.log()}")
        return " ready." in self.log_file.read_text(errors="replace")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-8000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is written; only the heartbeats stop."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM: Celery's warm shutdown."""
        os.kill(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def worker_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("worker-logs")
    yield path
    shutil.rmtree(path, ignore_errors=True)
