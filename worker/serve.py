"""``dama serve``: the whole service on one machine, with no external servers (the embedded default).

It migrates the job store (SQLite under ``DAMA_HOME`` unless ``DAMA_DATABASE_URL`` says otherwise), starts the API
(``dama api``) and one worker (``dama worker``) as child processes, and keeps them running until interrupted.
With ``--demo`` it then acts as a first user would, over HTTP only: creates an API key, builds the proving ground
(``dama_engine.proving``, cached under ``DAMA_PROVING_DIR``), uploads its on-policy pairs, held-out pairs and
held-out scenes, posts a DAMA job on the seeing base (``dama/tiny-seeing-llava``) with the proving ground's
settings, follows its progress, prints hallucination (CHAIR) and log-prob preference accuracy before and after,
downloads the adapter and prints where it is. The same commands with ``DAMA_DATABASE_URL`` / ``DAMA_BROKER_URL``
use Postgres and Redis.
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
from typing import Any

import httpx

from dama_engine.cli import ProgressPrinter
from dama_engine.proving import ProvingGround, default_root, prepare_proving_ground, training_values
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.repository import create_api_key, get_or_create_tenant
from jobstore.settings import Settings
from jobstore.spec import SEEING_MODEL

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


def _archive(archive: Path, data_file: Path, *extra: Path) -> Path:
    """``data_file`` (and ``extra`` files beside it) with the images its rows reference, zipped as a user would
    upload them."""
    folder = data_file.parent
    images: set[str] = set()
    for line in data_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        images.update(row.get("images") or [row["image"]])  # a preference pair's images, a scene's image
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in (data_file, *extra):
            bundle.write(path, path.name)
        for image in sorted(images):
            bundle.write(folder / image, image)
    return archive


def _upload(client: httpx.Client, archive: Path, data_format: str = "auto") -> dict[str, Any]:
    with archive.open("rb") as handle:
        response = client.post(
            "/datasets", files={"file": (archive.name, handle, "application/zip")}, data={"format": data_format}
        )
    response.raise_for_status()
    dataset: dict[str, Any] = response.json()
    print(f"[demo] uploaded {archive.name}: {dataset['id']} ({dataset['row_count']} rows)", flush=True)
    return dataset


def demo_spec(ground: ProvingGround, datasets: dict[str, str], *, steps: int | None, scenes: int) -> dict[str, Any]:
    """The demo's job: the proving ground's preference stage (``dama_engine.proving.training_values``: method,
    beta, filter width, learning rate, steps, batch, LoRA, all sent explicitly) on ``dama/tiny-seeing-llava``,
    evaluated on the held-out pairs and ``scenes`` held-out scenes."""
    engine = training_values(ground, ground.root, scenes=scenes)  # the run folder is the worker's, not this one
    objective, optim, lora = engine["objective"], engine["optim"], engine["lora"]
    return {
        "model": SEEING_MODEL,
        "dataset_id": datasets["train"],
        "method": objective["method"],
        "hyperparameters": {
            "beta": objective["beta"],
            "filter_sigma": objective["filter_sigma"],
            "learning_rate": optim["learning_rate"],
            "batch_size": optim["batch_size"],
            "max_steps": steps or optim["max_steps"],
            "warmup_ratio": optim["warmup_ratio"],
            "seed": optim["seed"],
            "max_length": engine["data"]["max_length"],
        },
        "lora": {key: lora[key] for key in ("r", "alpha", "dropout", "train_projector")},
        "evaluation": {
            "dataset_id": datasets["eval"],
            "generative_dataset_id": datasets["scenes"],
            "max_samples": engine["evaluation"]["max_samples"],
            "max_new_tokens": engine["evaluation"]["max_new_tokens"],
        },
    }


def _follow(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    """The job's progress as a bar until it ends; the ended job."""
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
    return job


def before_after_lines(evaluation: dict[str, Any]) -> list[str]:
    """The demo's report from a job's evaluation (base = before tuning, tuned = after): hallucination on the
    held-out scenes and log-prob preference accuracy on the held-out pairs. Both are measured on the base too,
    so neither "before" is zero by construction (unlike the implicit reward's accuracy)."""
    generative, preference = evaluation["generative"], evaluation["preference"]
    base, tuned = generative["base"], generative["tuned"]
    rates = ", ".join(
        f"{label} {base[key]:.3f} -> {tuned[key]:.3f}"
        for label, key in (("CHAIR_i", "chair_i"), ("CHAIR_s", "chair_s"), ("coverage", "coverage"))
    )
    accuracy = [preference[model]["overall"]["logp_accuracy"] for model in ("base", "tuned")]
    return [
        f"hallucination on {generative['samples']} held-out scenes, base -> tuned: {rates}",
        f"log-prob preference accuracy on {preference['pairs']} held-out pairs, base -> tuned: "
        f"{accuracy[0]:.3f} -> {accuracy[1]:.3f}",
    ]


def run_demo(
    base_url: str, settings: Settings, out_dir: Path, *, steps: int | None = None, scenes: int | None = None
) -> Path:
    """Build the proving ground here (cached), upload its pairs and held-out scenes, run a DAMA job on the seeing
    base through the API, report hallucination and preference accuracy before and after, download the adapter."""
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        tenant = get_or_create_tenant(session=session, name="demo")
        _row, api_key = create_api_key(session, tenant_id=tenant.id, pepper=settings.resolved_api_key_pepper)
    engine.dispose()
    print(
        f"[demo] tenant 'demo', API key {api_key}: sign in to the console ({base_url}/console) with this key; "
        f"for the dama commands: export DAMA_API_KEY={api_key}",
        flush=True,
    )
    headers = {"Authorization": f"Bearer {api_key}"}
    client = httpx.Client(base_url=base_url, headers=headers, timeout=120)
    root = default_root()
    print(
        f"[demo] proving ground in {root} (set DAMA_PROVING_DIR to move it): the first run builds the seeing base, "
        "its pairs and held-out scenes (1.5-3 min), later runs reuse them",
        flush=True,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars are noise here, as in dama-train
    # The build's own progress: the seeing base's training steps, then the sampling of its pairs, as bars.
    ground = prepare_proving_ground(root, callback=ProgressPrinter())
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        datasets = {
            "train": _upload(client, _archive(folder / "pairs-train.zip", ground.train)),
            "eval": _upload(client, _archive(folder / "pairs-eval.zip", ground.eval)),
            "scenes": _upload(
                client, _archive(folder / "scenes.zip", ground.generative, ground.vocabulary), "generative"
            ),
        }
    scenes = min(scenes or datasets["scenes"]["row_count"], datasets["scenes"]["row_count"])
    spec = demo_spec(ground, {role: dataset["id"] for role, dataset in datasets.items()}, steps=steps, scenes=scenes)
    response = client.post("/jobs", json=spec, headers={"Idempotency-Key": f"demo-{int(time.time())}"})
    response.raise_for_status()
    job = response.json()
    print(
        f"[demo] job {job['id']} on {SEEING_MODEL} queued (the worker builds the model on first use: stage "
        "building_model, about 1-2 min); follow it "
        f"with GET {base_url}/jobs/{job['id']}/events",
        flush=True,
    )
    job = _follow(client, job)
    if job["status"] != "succeeded":
        raise SystemExit(f"[demo] job {job['status']}: {json.dumps(job.get('error'))}")
    evaluation = (job.get("result") or {}).get("evaluation")
    if not evaluation or not evaluation.get("generative") or not evaluation.get("preference"):
        raise SystemExit(f"[demo] job {job['id']} has no evaluation of base and tuned in its result")
    for line in before_after_lines(evaluation):
        print(f"[demo] {line}", flush=True)
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
    parser.add_argument(
        "--demo-steps", type=int, default=None, help="optimizer steps of the demo job (default: the proving ground's)"
    )
    parser.add_argument(
        "--demo-scenes", type=int, default=None, help="held-out scenes the demo job is scored on (default: all)"
    )
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
            run_demo(base_url, settings, Path(args.demo_dir), steps=args.demo_steps, scenes=args.demo_scenes)
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
