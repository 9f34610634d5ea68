"""The whole service, as docker-compose.yml runs it, on real Postgres, Redis, uvicorn and a Celery worker.

The processes are started with exactly the compose commands (``dama migrate``, ``dama api``, ``dama worker``,
``dama infer``) and talked to over HTTP only (the chat routes with the official ``openai`` package). A second test
runs the embedded default (``dama serve --demo``: SQLite, the filesystem broker, no external servers), which is what
the README's run command does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.forward import GenerationRequest, GenerationSettings, generate
from dama_engine.proving.ground import ProvingGround
from dama_engine.proving.shapes import make_demo_dataset
from jobstore.settings import Settings
from tests.e2e.commands import COMPOSE_COMMANDS
from worker.engine_config import model_cache_root, seeing_base_dir

VENV_BIN = Path(sys.executable).parent
ENDED = {"succeeded", "failed", "cancelled"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _command(name: str) -> list[str]:
    """The compose command with the venv's ``dama`` (the same console script the image installs)."""
    program, *args = COMPOSE_COMMANDS[name]
    return [str(VENV_BIN / program), *args]


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def service(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from run_service(tmp_path_factory.mktemp("service"), pg_url, redis_url)


def run_service(
    root: Path, pg_url: str, redis_url: str, *, infer_port: int | None = None, **extra_env: str
) -> Iterator[dict[str, Any]]:
    """Migrate, then run the compose commands' API, worker and inference server (on ``infer_port``, default a free
    one; environment plus ``extra_env``) until closed; yields the URL, a key of tenant ``e2e``, the folder and the
    workers' model cache."""
    port, infer_port = _free_port(), infer_port or _free_port()
    env = {
        **os.environ,
        "DAMA_ENVIRONMENT": "production",
        "DAMA_DATABASE_URL": pg_url,
        "DAMA_BROKER_URL": redis_url,
        "DAMA_API_KEY_PEPPER": secrets.token_hex(16),
        "DAMA_ARTIFACTS_DIR": str(root / "artifacts"),
        "DAMA_MODEL_CACHE_DIR": str(root / "models"),
        "DAMA_DEFAULT_QUEUE": f"e2e-{secrets.token_hex(3)}",
        "DAMA_API_HOST": "127.0.0.1",
        "DAMA_API_PORT": str(port),
        "DAMA_METRICS_FLUSH_S": "0.2",
        "OMP_NUM_THREADS": "1",
        # compose's infer service: the API reaches it on its own port with the shared secret
        "DAMA_INFER_HOST": "127.0.0.1",
        "DAMA_INFER_PORT": str(infer_port),
        "DAMA_INFERENCE_URL": f"http://127.0.0.1:{infer_port}/v1",
        "DAMA_INFERENCE_SECRET": secrets.token_urlsafe(24),
        **extra_env,
    }
    env["DAMA_WORKER_QUEUES"] = env["DAMA_DEFAULT_QUEUE"]
    subprocess.run(_command("migrate"), env=env, check=True, timeout=120)
    logs = {name: (root / f"{name}.log").open("wb") for name in ("api", "worker", "infer")}
    processes = {
        name: subprocess.Popen(
            _command(name), env=env, stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True
        )
        for name in ("api", "worker", "infer")
    }
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, (root / "api.log").read_text()[-3000:]
        time.sleep(0.3)
    key = subprocess.run(
        [str(VENV_BIN / "dama"), "admin", "create-key", "--tenant", "e2e"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        yield {"url": base_url, "key": key, "root": root, "models": root / "models", "env": env}
    finally:
        for process in processes.values():
            _stop(process)
        for handle in logs.values():
            handle.close()


def _dataset_zip(folder: Path, n_train: int, n_eval: int) -> tuple[bytes, bytes]:
    data = make_demo_dataset(folder, n_train=n_train, n_eval=n_eval, n_generative=0, with_hardness=True)
    archives = []
    for split, prefix in ((data.train, "train_"), (data.eval, "eval_")):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as bundle:
            bundle.write(split, split.name)
            for image in sorted(data.images_dir.glob(f"{prefix}*")):
                bundle.write(image, f"images/{image.name}")
        archives.append(buffer.getvalue())
    return archives[0], archives[1]


def _wait(client: httpx.Client, job_id: str, done: Any, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def _download_adapter(client: httpx.Client, url: str, folder: Path) -> Path:
    """GET an adapter archive (``/jobs/{id}/adapter`` or a checkpoint's), check its sha256 and unpack it into
    ``folder``: the folder that holds ``adapter_config.json``."""
    download = client.get(url)
    assert download.status_code == 200, download.text
    assert hashlib.sha256(download.content).hexdigest() == download.headers["X-Content-SHA256"]
    with tarfile.open(fileobj=io.BytesIO(download.content)) as bundle:
        bundle.extractall(folder, filter="data")
    return next(path.parent for path in folder.rglob("adapter_config.json"))


def test_upload_train_follow_and_download(service: dict[str, Any], tmp_path: Path) -> None:
    client = httpx.Client(base_url=service["url"], headers={"Authorization": f"Bearer {service['key']}"}, timeout=60)
    train_zip, eval_zip = _dataset_zip(tmp_path / "data", n_train=96, n_eval=16)
    train = client.post("/datasets", files={"file": ("train.zip", train_zip, "application/zip")})
    assert train.status_code == 201, train.text
    held_out = client.post("/datasets", files={"file": ("eval.zip", eval_zip, "application/zip")}).json()
    assert train.json()["row_count"] == 96 and train.json()["image_count"] == 96

    spec = {
        "model": "dama/tiny-llava",
        "dataset_id": train.json()["id"],
        "method": "dama",
        "hyperparameters": {"learning_rate": 5e-3, "batch_size": 8, "epochs": 4, "checkpoint_every": 10},
        "evaluation": {"dataset_id": held_out["id"]},
    }
    created = client.post("/jobs", json=spec, headers={"Idempotency-Key": "e2e-1"})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    again = client.post("/jobs", json=spec, headers={"Idempotency-Key": "e2e-1"})
    assert again.json()["id"] == job_id

    # Metrics grow while it trains.
    training = _wait(client, job_id, lambda j: (j["stage"] == "training" and j["step"] >= 3) or j["status"] in ENDED)
    assert training["status"] == "running" and training["total_steps"] == 48
    first = client.get(f"/jobs/{job_id}/metrics", params={"keys": "loss"}).json()["series"]["loss"]
    finished = _wait(client, job_id, lambda j: j["status"] in ENDED)
    assert finished["status"] == "succeeded", finished
    last = client.get(f"/jobs/{job_id}/metrics", params={"keys": "loss"}).json()["series"]["loss"]
    assert 0 < len(first) < len(last) == 48 and [step for step, _ in last] == list(range(1, 49))
    assert finished["result"]["eval_after"]["eval_accuracy"] > finished["result"]["eval_before"]["eval_accuracy"]

    # Events, through the live stream, arrive in order and cover every stage.
    with client.stream("GET", f"/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    seqs = [event["seq"] for event in events]
    assert seqs == sorted(seqs) == list(range(1, len(seqs) + 1))
    stages = [e["data"]["stage"] for e in events if e["type"] == "stage"]
    if stages[0] == "building_model":  # the first job on this worker builds dama/tiny-llava first
        stages = stages[1:]
    # held-out metrics before and after training, then base against tuned once the adapter is written
    assert stages == [
        "validating",
        "loading_model",
        "scoring",
        "reference",
        "evaluating",
        "training",
        "evaluating",
        "exporting",
        "evaluating",
    ]
    assert finished["result"]["evaluation"]["preference"]["implicit_reward"]["overall"]["count"] == 16
    assert len(client.get(f"/jobs/{job_id}/checkpoints").json()["data"]) >= 1

    # The adapter downloads with its sha256 and loads with peft on the base model.
    adapter_dir = _download_adapter(client, f"/jobs/{job_id}/adapter", tmp_path / "adapter")
    base_dir = next(p.parent for p in service["models"].rglob("config.json") if "llava" in p.read_text())
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter_dir).eval()
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        tuned_logits = model(input_ids=tokens).logits
    assert torch.isfinite(tuned_logits).all()

    # Any kept checkpoint downloads as an adapter that loads on the base.
    kept = [item["step"] for item in client.get(f"/jobs/{job_id}/checkpoints").json()["data"]]
    checkpoint = _download_adapter(client, f"/jobs/{job_id}/checkpoints/{kept[-1]}/adapter", tmp_path / "checkpoint")
    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), checkpoint)

    # The tuned model answers through compose's infer service, the openai package as client, as the adapter does
    # when loaded by hand: the same greedy text from the chat route and from peft + generate here.
    image = next((tmp_path / "data" / "images").glob("eval_*"))
    url = f"data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    chat = openai.OpenAI(base_url=f"{service['url']}/v1", api_key=service["key"], max_retries=3, timeout=120)
    answer = chat.chat.completions.create(model=job_id, messages=messages, max_tokens=16, temperature=0)
    processor = AutoProcessor.from_pretrained(base_dir)
    request = GenerationRequest.from_prompt("Describe the image.", [Image.open(image).convert("RGB")])
    local = generate(model, processor, [request], GenerationSettings(max_new_tokens=16))[0]
    assert answer.choices[0].message.content == local and answer.model == job_id
    assert any(model_.id == job_id for model_ in chat.models.list())

    # A merged export runs on the worker; its weights give the logits of base + adapter, without peft.
    asked = client.post(f"/jobs/{job_id}/exports", json={"format": "merged"})
    assert asked.status_code == 202, asked.text
    export_url = f"/jobs/{job_id}/exports/{asked.json()['id']}"
    deadline = time.monotonic() + 120
    while (export := client.get(export_url).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, export
        time.sleep(0.3)
    assert export["status"] == "succeeded", export
    merged = client.get(f"{export_url}/download")
    assert merged.status_code == 200 and len(merged.content) == export["size_bytes"]
    assert hashlib.sha256(merged.content).hexdigest() == export["sha256"] == merged.headers["X-Content-SHA256"]
    tail = client.get(f"{export_url}/download", headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == merged.content[-100:]
    with tarfile.open(fileobj=io.BytesIO(merged.content)) as bundle:
        assert {"config.json", "model.safetensors", "README.md"} <= set(bundle.getnames())
        bundle.extractall(tmp_path / "merged", filter="data")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=tokens).logits, tuned_logits, atol=1e-4, rtol=1e-4)


def test_cancel_mid_training(service: dict[str, Any], tmp_path: Path) -> None:
    client = httpx.Client(base_url=service["url"], headers={"Authorization": f"Bearer {service['key']}"}, timeout=60)
    train_zip, _ = _dataset_zip(tmp_path / "data", n_train=64, n_eval=16)
    dataset = client.post("/datasets", files={"file": ("train.zip", train_zip, "application/zip")}).json()
    spec = {
        "model": "dama/tiny-llava",
        "dataset_id": dataset["id"],
        "hyperparameters": {"batch_size": 4, "epochs": 20, "learning_rate": 1e-3},
    }
    job_id = client.post("/jobs", json=spec).json()["id"]
    running = _wait(client, job_id, lambda j: j["step"] >= 2 or j["status"] in ENDED)
    assert running["status"] == "running"
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    cancelled = _wait(client, job_id, lambda j: j["status"] in ENDED, timeout=60)
    assert cancelled["status"] == "cancelled" and cancelled["step"] < cancelled["total_steps"]
    assert client.get(f"/jobs/{job_id}/adapter").status_code == 409


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The process's output up to and including the first line with ``marker`` (fails on exit or timeout)."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
    raise AssertionError(f"the process ended before {marker!r}:\n" + "".join(lines)[-3000:])


def test_embedded_default_runs_the_demo_with_no_servers(tmp_path: Path, proving_ground: ProvingGround) -> None:
    """`dama serve --demo --rounds 2` (the README's run command) on SQLite and the filesystem broker: scenes
    uploaded as generative sets, a 2-round loop on dama/tiny-seeing-llava in which the service samples the pairs,
    trains and evaluates, hallucination base -> each round, the last round's adapter downloaded, the base and the
    tuned model side by side on a held-out scene through the chat API. Shorter than the real demo (200 scenes
    sampled, 20 steps, 50 held-out scenes). Then, with the service still up, the tuned model answers the 50
    held-out scenes through /v1/chat/completions (the openai package, 8 at a time): its CHAIR_i there is its
    evaluation's, within 0.02."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DAMA_")  # nothing configured: the embedded default
    }
    home = tmp_path / ".dama"
    port = _free_port()
    env.update(
        {
            "DAMA_HOME": str(home),
            "DAMA_API_PORT": str(port),
            "DAMA_INFER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": "1",
        }
    )
    # The worker's build of the seeing base (the same recipe as the ground's, tests/worker/test_engine_config.py)
    # would add about a minute: its model cache gets the session's copy.
    shutil.copytree(
        proving_ground.base,
        seeing_base_dir(model_cache_root(Settings(home=home, scratch_dir=None, model_cache_dir=None))),
    )
    scenes = 50
    command = [str(VENV_BIN / "dama"), "serve", "--demo", "--rounds", "2"]
    command += ["--demo-prompts", "200", "--demo-steps", "20", "--demo-scenes", str(scenes)]
    command += ["--demo-dir", str(tmp_path / "out")]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout = _read_until(process, "[serve] serving", timeout=420)
        # The demo's tenant and key, to find its loop in the console.
        key = re.search(r"\[demo\] tenant 'demo', API key (dama_\S+): sign in to the console", stdout)
        assert key, stdout[-3000:]
        assert re.search(r"\[demo\] loop loop_\S+ of 2 rounds on dama/tiny-seeing-llava", stdout)
        number = r"([0-9]+\.[0-9]{3})"
        for round_ in (1, 2):
            line = rf"\[demo\] round {round_}: [0-9]+ pairs; CHAIR_i {number}, CHAIR_s {number}, coverage {number}\n"
            assert re.search(line, stdout), stdout[-3000:]
        pairs = re.search(
            r"\[demo\] pairs per round: ([0-9]+), ([0-9]+) \(from 200 scenes sampled, 8 answers each\)", stdout
        )
        assert pairs and int(pairs.group(1)) > 0 and int(pairs.group(2)) > 0, stdout[-3000:]
        hallucination = re.search(
            rf"\[demo\] hallucination on {scenes} held-out scenes, base -> round 1 -> round 2: "
            rf"CHAIR_i {number} -> {number} -> {number}; CHAIR_s {number} -> {number} -> {number}; "
            rf"coverage {number} -> {number} -> {number}\n",
            stdout,
        )
        assert hallucination, stdout[-3000:]
        # "Before" is the base model measured, never a zero by construction: the seeing base hallucinates (it calls
        # orange objects red).
        assert float(hallucination.group(1)) > 0
        assert list((tmp_path / "out").glob("job_*-adapter/adapter_model.safetensors"))
        assert (home / "dama.db").is_file()
        # The base and the tuned model, side by side on a held-out scene, through the chat route.
        side = re.search(
            r"\[demo\] the base and the tuned model through \S+/v1/chat/completions: different answers on ([0-9]+) of "
            r"the first 16 held-out scenes; scene [0-9]+ .*\n"
            r"\[demo\]   base  dama/tiny-seeing-llava: (.*) \(hallucinated: .*\)\n"
            r"\[demo\]   tuned (job_\S+): (.*) \(hallucinated: .*\)\n",
            stdout,
        )
        assert side, stdout[-3000:]
        job_id = side.group(3)
        assert int(side.group(1)) > 0 and side.group(2) != side.group(4), "the tuned model answers some differently"
        assert f"dama chat --model {job_id} --image" in stdout
        _chat_matches_the_evaluation(f"http://127.0.0.1:{port}", key.group(1), job_id, tmp_path, scenes)
    finally:
        _stop(process)


def _chat_matches_the_evaluation(url: str, key: str, job_id: str, tmp_path: Path, scenes: int) -> None:
    """The tuned model's CHAIR_i over the held-out scenes through /v1/chat/completions (greedy, the evaluation's
    token budget) is the one its evaluation reported, within 0.02."""
    from concurrent.futures import ThreadPoolExecutor

    from dama_engine.data.matcher import chair
    from worker.serve import DESCRIPTION_TOKENS, held_out_scenes

    held_out = held_out_scenes(tmp_path / "held-out")  # the demo's own held-out scenes
    rows = [json.loads(line) for line in held_out.generative_eval.read_text().splitlines()][:scenes]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=3, timeout=120)

    def ask(row: dict[str, Any]) -> str:
        image = (held_out.generative_eval.parent / row["image"]).read_bytes()
        part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(image).decode()}"}}
        messages: Any = [{"role": "user", "content": [part, {"type": "text", "text": row["prompt"]}]}]
        completion = client.chat.completions.create(
            model=job_id, messages=messages, max_tokens=DESCRIPTION_TOKENS, temperature=0
        )
        return completion.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, rows))
    vocabulary = json.loads(held_out.vocabulary.read_text())
    through_chat = chair(answers, [row["objects"] for row in rows], vocabulary)["chair_i"]
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    loop = next(iter(http.get("/loops").json()["data"]))
    evaluated = loop["rounds"][-1]["metrics"]["chair_i"]
    assert loop["rounds"][-1]["job"]["id"] == job_id
    assert abs(through_chat - evaluated) <= 0.02, (through_chat, evaluated)
