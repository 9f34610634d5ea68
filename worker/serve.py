"""``dama serve``: the whole service on one machine, with no external servers (the embedded default).

It migrates the job store (SQLite under ``DAMA_HOME`` unless ``DAMA_DATABASE_URL`` says otherwise), starts the API
(``dama api``) and one worker (``dama worker``) as child processes, and keeps them running until interrupted.
With ``--demo`` it then acts as a first user would, over HTTP only: creates an API key, uploads the synthetic
demo dataset, posts a DAMA job on the built-in tiny model, follows its progress, downloads the adapter and
prints where it is. The same commands with ``DAMA_DATABASE_URL`` / ``DAMA_BROKER_URL`` use Postgres and Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.repository import create_api_key, get_or_create_tenant
from jobstore.settings import Settings

TERMINAL = {"succeeded", "failed", "cancelled"}


def _dama(*args: str) -> list[str]:
    """The ``dama`` console command, run with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "api.cli", *args]


def _start(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    log = (log_dir / f"{name}.log").open("ab")
    print(f"[serve] starting {name}: {' '.join(command[2:])} (log: {log_dir / (name + '.log')})", flush=True)
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(base_url: str, processes: list[subprocess.Popen[bytes]], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise SystemExit(f"[serve] a service process exited early (code {process.returncode}); see its log")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"[serve] the API did not become ready at {base_url} within {timeout:.0f} s")


def _demo_archive(folder: Path, n_train: int) -> Path:
    """The demo dataset (train split + images) zipped, as a user would upload it."""
    from dama_engine.data.demo import make_demo_dataset

    n_eval = max(16, n_train // 8)
    data = make_demo_dataset(
        folder / "data", n_train=n_train, n_eval=n_eval, n_generative=0, seed=0, with_hardness=True
    )
    archive = folder / "demo-dataset.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.write(data.train, "train.jsonl")
        for image in sorted(data.images_dir.glob("train_*")):
            bundle.write(image, f"images/{image.name}")
    eval_archive = folder / "demo-eval.zip"
    with zipfile.ZipFile(eval_archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.write(data.eval, "eval.jsonl")
        for image in sorted(data.images_dir.glob("eval_*")):
            bundle.write(image, f"images/{image.name}")
    return folder


def run_demo(base_url: str, settings: Settings, out_dir: Path, *, n_train: int = 1600, epochs: int = 4) -> Path:
    """Upload the demo data, run a DAMA job through the API, download and unpack the adapter."""
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        tenant = get_or_create_tenant(session=session, name="demo")
        _row, api_key = create_api_key(session, tenant_id=tenant.id, pepper=settings.resolved_api_key_pepper)
    engine.dispose()
    headers = {"Authorization": f"Bearer {api_key}"}
    client = httpx.Client(base_url=base_url, headers=headers, timeout=120)
    with tempfile.TemporaryDirectory() as scratch:
        folder = _demo_archive(Path(scratch), n_train)
        uploaded = {}
        for name in ("demo-dataset.zip", "demo-eval.zip"):
            with (folder / name).open("rb") as handle:
                response = client.post("/datasets", files={"file": (name, handle, "application/zip")})
            response.raise_for_status()
            uploaded[name] = response.json()
            print(f"[demo] uploaded {name}: {uploaded[name]['id']} ({uploaded[name]['row_count']} rows)", flush=True)
    spec = {
        "model": "dama/tiny-llava",
        "dataset_id": uploaded["demo-dataset.zip"]["id"],
        "method": "dama",
        "hyperparameters": {"learning_rate": 1e-2, "batch_size": 16, "epochs": epochs, "max_length": 256},
        "lora": {"r": 32, "alpha": 32, "dropout": 0.0, "train_projector": True},
        "evaluation": {"dataset_id": uploaded["demo-eval.zip"]["id"]},
    }
    response = client.post("/jobs", json=spec, headers={"Idempotency-Key": f"demo-{int(time.time())}"})
    response.raise_for_status()
    job = response.json()
    print(f"[demo] job {job['id']} queued; follow it with GET {base_url}/jobs/{job['id']}/events", flush=True)
    from tqdm import tqdm

    bar = tqdm(total=1, desc="queued", unit="step", dynamic_ncols=True)
    while job["status"] not in TERMINAL:
        time.sleep(1.0)
        job = client.get(f"/jobs/{job['id']}").json()
        if job.get("total_steps") and bar.total != job["total_steps"]:
            bar.total = job["total_steps"]
        bar.set_description(f"{job['status']} / {job.get('stage') or '-'}")
        eta = job.get("eta_seconds")
        bar.set_postfix_str(f"ETA {eta:.0f} s" if isinstance(eta, int | float) else "", refresh=False)
        bar.n = job.get("step") or 0
        bar.refresh()
    bar.close()
    if job["status"] != "succeeded":
        raise SystemExit(f"[demo] job {job['status']}: {json.dumps(job.get('error'))}")
    result = job.get("result") or {}
    before = (result.get("eval_before") or {}).get("eval_accuracy")
    after = (result.get("eval_after") or {}).get("eval_accuracy")
    if before is not None and after is not None:
        print(f"[demo] held-out preference accuracy: before {before:.3f} -> after {after:.3f}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{job['id']}-adapter.tar.gz"
    with client.stream("GET", f"/jobs/{job['id']}/adapter") as download:
        download.raise_for_status()
        sha = download.headers.get("X-Content-SHA256", "")
        with archive.open("wb") as handle:
            for chunk in download.iter_bytes():
                handle.write(chunk)
    target = out_dir / f"{job['id']}-adapter"
    with tarfile.open(archive) as bundle:
        bundle.extractall(target, filter="data")
    print(f"[demo] adapter: {target} (archive {archive}, sha256 {sha})", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dama serve", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="run the demo job through the API once it is up")
    parser.add_argument("--demo-dir", default="runs/serve-demo", help="where the demo's adapter goes")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop the service when the demo is done")
    parser.add_argument("--demo-pairs", type=int, default=1600, help="training pairs of the demo dataset")
    parser.add_argument("--demo-epochs", type=int, default=4, help="epochs of the demo job")
    parser.add_argument("--host", default=None, help="address the API listens on (default DAMA_API_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="the API's port (default DAMA_API_PORT, 8000)")
    args = parser.parse_args(argv)
    # The settings and the API child read the address from the environment: the options override it for this run.
    if args.host is not None:
        os.environ["DAMA_API_HOST"] = args.host
    if args.port is not None:
        os.environ["DAMA_API_PORT"] = str(args.port)

    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))

    print(f"[serve] job store: {settings.resolved_database_url}", flush=True)
    subprocess.run(_dama("migrate"), env=env, check=True)
    processes = [
        _start("api", _dama("api"), env, log_dir),
        _start("worker", _dama("worker"), env, log_dir),
    ]
    base_url = f"http://{settings.api_host}:{settings.api_port}"

    def stop(*_: object) -> None:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def on_sigterm(*_: object) -> None:
        stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _wait_ready(base_url, processes)
        print(f"[serve] API ready at {base_url} (docs: {base_url}/docs)", flush=True)
        if args.demo:
            run_demo(base_url, settings, Path(args.demo_dir), n_train=args.demo_pairs, epochs=args.demo_epochs)
            if args.exit_after_demo:
                return 0
        print("[serve] serving; press Ctrl-C to stop", flush=True)
        while all(process.poll() is None for process in processes):
            time.sleep(1.0)
        print("[serve] a service process exited; stopping", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
