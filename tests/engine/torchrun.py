"""Launching the engine under ``torchrun`` from a test: 2 CPU processes (gloo), a free port, a time limit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU and gloo also on a GPU host: the same float32 numerics everywhere
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def torchrun(nproc: int) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N --master_port P`` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]


def run_or_fail(command: list[str], log: Path, timeout_s: float) -> None:
    """Run ``command`` in the repository with its output in ``log``; fail the test, quoting the log's tail, when
    it exits non-zero or outlives ``timeout_s``."""
    with log.open("w") as stream:
        process = subprocess.Popen(command, cwd=REPO, env=launch_env(), stdout=stream, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # SIGTERM lets torchrun end its workers (each runs in a session of its own); SIGKILL if it does not.
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pytest.fail(f"{' '.join(command)} did not finish in {timeout_s} s:\n{log.read_text()[-6000:]}")
    assert process.returncode == 0, f"{' '.join(command)} exited {process.returncode}:\n{log.read_text()[-6000:]}"
