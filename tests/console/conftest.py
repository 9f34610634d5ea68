"""The whole service for the browser test: ``dama migrate``, ``dama api`` (with uvicorn's access log), ``dama worker``
and the inference backend ``dama infer`` (the playground's chat) as processes on real Postgres and Redis, training
and answering with the built-in tiny model on the CPU."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.console.browser import available

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until ``url`` answers 200 (the process still running), else fail with the end of its log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)


@dataclass
class Service:
    url: str
    key: str
    root: Path
    api_log: Path
    infer: subprocess.Popen[bytes]
    infer_health: str

    def wait_for_infer(self, timeout: float = 90) -> None:
        """The inference backend is started with the rest but not waited for there (it imports torch: ~10 s on
        2 cores, while the test's first jobs train); the playground waits for it."""
        _wait_ready(self.infer_health, self.infer, self.root / "infer.log", timeout)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def service(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if not available():
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    root = tmp_path_factory.mktemp("console")
    port, infer_port = _free_port(), _free_port()
    while infer_port == port:
        infer_port = _free_port()
    inference_secret = secrets.token_urlsafe(24)
    queue = f"console-{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "DAMA_DATABASE_URL": pg_url,
        "DAMA_BROKER_URL": redis_url,
        "DAMA_API_KEY_PEPPER": secrets.token_hex(16),
        "DAMA_ARTIFACTS_DIR": str(root / "artifacts"),
        "DAMA_MODEL_CACHE_DIR": str(root / "models"),
        "DAMA_DEFAULT_QUEUE": queue,
        "DAMA_WORKER_QUEUES": queue,
        "DAMA_API_HOST": "127.0.0.1",
        "DAMA_API_PORT": str(port),
        "DAMA_METRICS_FLUSH_S": "0.2",
        # dama infer serves the same artifact store and model cache as the worker; the API forwards /v1 to it
        "DAMA_INFER_HOST": "127.0.0.1",
        "DAMA_INFER_PORT": str(infer_port),
        "DAMA_INFERENCE_SECRET": inference_secret,
        "DAMA_INFERENCE_URL": f"http://127.0.0.1:{infer_port}/v1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    dama = str(VENV_BIN / "dama")
    commands = {"api": [dama, "api", "--log-level", "info"], "worker": [dama, "worker"], "infer": [dama, "infer"]}
    logs = {name: (root / f"{name}.log").open("wb") for name in commands}
    processes = {
        name: subprocess.Popen(command, env=env, stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True)
        for name, command in commands.items()
    }
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(f"{url}/readyz", processes["api"], root / "api.log", 90)
        key = subprocess.run(
            [dama, "admin", "create-key", "--tenant", "console"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        infer_health = f"http://127.0.0.1:{infer_port}/health"
        yield Service(url, key, root, root / "api.log", processes["infer"], infer_health)
    finally:
        for process in processes.values():
            _stop(process)
        for handle in logs.values():
            handle.close()
