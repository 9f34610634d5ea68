"""A real API server (``uvicorn --factory api.app:create_app`` in a child process) on real Postgres and Redis.

Two servers per session share one database: ``api_server`` (Redis broker, a queue of its own that no worker
consumes, a CLIP hardness scorer configured) and ``limited_server`` (a 4 KiB upload limit, at most 3 prompts per
pair generation, a broker port with nothing listening, no hardness scorer), so the tests speak HTTP to the same
process a deployment runs. ``worker_queue`` is a real Celery worker on ``api_server``'s database and artifact store,
consuming a queue of its own (started once for tests/api, for the tests that run evaluations and pair generations).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.models import Dataset
from worker.serve import wait_until_answering

ROOT = Path(__file__).resolve().parents[2]
PEPPER = "test-pepper-" + secrets.token_hex(8)
LIMITED_MAX_UPLOAD_BYTES = 4096
# The CLIP scorer the operator of ``api_server`` names (no worker consumes its queue, so it is never loaded):
# its jobs may use dama on rows without hardness; ``limited_server`` names none.
API_SERVER_SCORER = "openai/clip-vit-base-patch32"
LIMITED_MAX_PROMPTS = 3


@dataclass
class ApiServer:
    url: str
    artifacts: Path
    queue: str
    env: dict[str, str]

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def files(self) -> set[str]:
        """Every file and folder under the artifact store (relative paths)."""
        return {str(path.relative_to(self.artifacts)) for path in self.artifacts.rglob("*")}


SECRET = "test-inference-secret-0123456789abcdef"  # the API and the inference backend share it in the tests


@dataclass
class Infer:
    url: str
    log: Path


def start_infer(tmp: Path, *, artifacts: Path, models: Path, **extra: str) -> Iterator[Infer]:
    """``python -m worker.infer`` (what ``dama infer`` runs) on a free port, with :data:`SECRET`, serving the artifact
    store at ``artifacts`` and building models into ``models``, until the generator is closed."""
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DAMA_")}
    env.update(
        DAMA_ARTIFACTS_DIR=str(artifacts),
        DAMA_MODEL_CACHE_DIR=str(models),
        DAMA_HOME=str(tmp / "home"),
        DAMA_INFERENCE_SECRET=SECRET,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    )
    log = tmp / "infer.log"
    command = [sys.executable, "-m", "worker.infer", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/health", [process], timeout=60, log=log)
        yield Infer(url, log)
    finally:
        stop_process(process, timeout=15)


def stop_process(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


JUDGE = "lister"  # the api_server's judge target


def _server_env(pg_url: str, broker_url: str, artifacts: Path, queue: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DAMA_")}
    env.update(
        DAMA_DATABASE_URL=pg_url,
        DAMA_BROKER_URL=broker_url,
        DAMA_ARTIFACTS_DIR=str(artifacts),
        DAMA_API_KEY_PEPPER=PEPPER,
        DAMA_DEFAULT_QUEUE=queue,
        DAMA_HOME=str(artifacts.parent / "home"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    )
    return env


def _start(
    tmp: Path, env: dict[str, str], queue: str, *, runner: Sequence[str] = ("-m", "uvicorn")
) -> Iterator[ApiServer]:
    """Run ``python <runner> --factory api.app:create_app ...`` (``runner``: uvicorn's CLI, or a script that
    prepares the process and then runs it) until the fixture ends."""
    port = _free_port()
    log_path = tmp / "server.log"
    command = [sys.executable, *runner, "--factory", "api.app:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ApiServer(f"http://127.0.0.1:{port}", Path(env["DAMA_ARTIFACTS_DIR"]), queue, env)
    try:
        wait_until_answering(f"{server.url}/healthz", [process], timeout=30, log=log_path)
        yield server
    finally:
        stop_process(process, timeout=10)
        errors = log_path.read_text(errors="replace")
        if "Traceback" in errors:
            print(f"API server log ({log_path}):\n{errors}", file=sys.stderr)


@pytest.fixture(scope="session")
def api_server(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("api")
    queue = f"test-api-{secrets.token_hex(4)}"
    env = _server_env(
        pg_url,
        redis_url,
        tmp / "artifacts",
        queue,
        DAMA_HARDNESS_SCORER=API_SERVER_SCORER,
        # A judge the API knows by name (pair generations on prompt sets); nothing of this session calls it.
        DAMA_JUDGE_TARGETS=json.dumps({JUDGE: {"url": "http://127.0.0.1:9/v1", "model": "lister"}}),
        # Job estimates wait this long for the worker of worker_queue (its first one imports the model's classes,
        # slow on a loaded 2-core machine); the tests of the 202 path ask for no wait (?wait=0).
        DAMA_ESTIMATE_WAIT_S="60",
    )
    yield from _start(tmp, env, queue)
    redis.Redis.from_url(redis_url).delete(queue)


@pytest.fixture(scope="session")
def limited_server(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """Small uploads only, and a broker that is down (nothing listens on its port)."""
    tmp = tmp_path_factory.mktemp("api-limited")
    queue = f"test-api-{secrets.token_hex(4)}"
    dead_broker = f"redis://127.0.0.1:{_free_port()}/0"
    env = _server_env(
        pg_url,
        dead_broker,
        tmp / "artifacts",
        queue,
        DAMA_MAX_UPLOAD_BYTES=str(LIMITED_MAX_UPLOAD_BYTES),
        DAMA_PAIRS_MAX_PROMPTS=str(LIMITED_MAX_PROMPTS),
    )
    yield from _start(tmp, env, queue)


@pytest.fixture(scope="package")
def worker_queue(api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Celery worker on the API server's database and artifact store, consuming a queue of its own. Stopped when
    tests/api ends: its sweeper and webhook dispatcher must not act on the worker tests' runs and deliveries."""
    from jobstore.settings import Settings
    from tests.worker.conftest import WorkerProcess
    from worker.engine_config import ensure_tiny_model, model_cache_root

    home = tmp_path_factory.mktemp("api-worker")
    queue = f"test-worker-{secrets.token_hex(4)}"
    settings = Settings(
        home=home,
        database_url=api_server.env["DAMA_DATABASE_URL"],
        broker_url=api_server.env["DAMA_BROKER_URL"],
        artifacts_dir=api_server.artifacts,
        model_cache_dir=home / "models",
        default_queue=queue,
        metrics_flush_s=0.25,
    )
    ensure_tiny_model("llava", model_cache_root(settings))  # built here once, not inside the timed runs
    worker = WorkerProcess(settings, queue, home, "api")
    yield queue
    worker.stop()
    redis.Redis.from_url(api_server.env["DAMA_BROKER_URL"]).delete(queue)


@pytest.fixture(scope="session")
def db_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def db(db_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(db_engine)


def create_key(db: sessionmaker[Session], tenant: str) -> str:
    with session_scope(db) as session:
        row = repository.get_or_create_tenant(session, name=tenant)
        _, key = repository.create_api_key(session, tenant_id=row.id, pepper=PEPPER)
    return key


@pytest.fixture(scope="session")
def key1(api_server: ApiServer) -> str:
    """Tenant t1's key, made with the CLI (`dama admin create-key`): stdout holds the key and nothing else."""
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "admin", "create-key", "--tenant", "t1"],
        cwd=ROOT,
        env=api_server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = result.stdout.strip()
    assert key.startswith("dama_") and "\n" not in key, result.stdout
    return key


@pytest.fixture(scope="session")
def key2(db: sessionmaker[Session]) -> str:
    return create_key(db, "t2")


@pytest.fixture(scope="session")
def client1(api_server: ApiServer, key1: str) -> Iterator[httpx.Client]:
    with api_server.client(key1) as client:
        yield client


@pytest.fixture(scope="session")
def client2(api_server: ApiServer, key2: str) -> Iterator[httpx.Client]:
    with api_server.client(key2) as client:
        yield client


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def demo_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A zip of the demo dataset's train.jsonl and images/ (6 rows, 6 images)."""
    return demo_zip(tmp_path_factory.mktemp("demo"))


def demo_zip(folder: Path) -> bytes:
    """The demo dataset (6 rows, 6 images of 32 px), made in ``folder``, as a zip of train.jsonl and images/."""
    from dama_engine.proving.shapes import make_demo_dataset

    demo = make_demo_dataset(folder, n_train=6, n_eval=0, n_generative=0, image_size=32)
    members = {"train.jsonl": demo.train.read_bytes()}
    for image in sorted(demo.images_dir.iterdir()):
        members[f"images/{image.name}"] = image.read_bytes()
    return zip_bytes(members)


def upload(client: httpx.Client, content: bytes, filename: str, **form: str) -> httpx.Response:
    headers = {"Idempotency-Key": form.pop("idempotency_key")} if "idempotency_key" in form else {}
    return client.post("/datasets", files={"file": (filename, content)}, data=form, headers=headers)


@pytest.fixture(scope="session")
def dataset1(client1: httpx.Client, demo_archive: bytes) -> dict[str, Any]:
    response = upload(client1, demo_archive, "demo.zip", name="demo")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="session")
def dataset2(client2: httpx.Client, demo_archive: bytes) -> dict[str, Any]:
    response = upload(client2, demo_archive, "demo.zip", name="other tenant's")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def dataset_count(db: sessionmaker[Session]) -> int:
    with db() as session:
        return int(session.scalar(select(func.count()).select_from(Dataset)) or 0)


class ResponseLike(Protocol):
    """httpx's Response, or the one Starlette's TestClient returns."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


def assert_error(response: ResponseLike, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is ``status`` with the API's error shape (and ``code``); returns the error object."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"type", "code", "message", "param"}, error
    if code is not None:
        assert error["code"] == code, error
    return error
