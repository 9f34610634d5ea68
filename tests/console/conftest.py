"""The whole service for the browser test: ``dama migrate``, ``dama api`` (with uvicorn's access log) and
``dama worker`` as processes on real Postgres and Redis, training the built-in tiny model on the CPU."""

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


@dataclass
class Service:
    url: str
    key: str
    root: Path
    api_log: Path


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
    port = _free_port()
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
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    dama = str(VENV_BIN / "dama")
    commands = {"api": [dama, "api", "--log-level", "info"], "worker": [dama, "worker"]}
    logs = {name: (root / f"{name}.log").open("wb") for name in commands}
    processes = {
        name: subprocess.Popen(command, env=env, stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True)
        for name, command in commands.items()
    }
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (root / "api.log").read_text()[-3000:]
            time.sleep(0.3)
        key = subprocess.run(
            [dama, "admin", "create-key", "--tenant", "console"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        yield Service(url=url, key=key, root=root, api_log=root / "api.log")
    finally:
        for process in processes.values():
            _stop(process)
        for handle in logs.values():
            handle.close()
