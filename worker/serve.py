"""``dama serve``: the whole service on one machine, with no external servers (the embedded default).

It migrates the job store (SQLite under ``DAMA_HOME`` unless ``DAMA_DATABASE_URL`` says otherwise), starts the API
(``dama api``), one worker (``dama worker``) and, unless ``DAMA_INFERENCE_URL`` names one, the inference backend of
the chat routes (``dama infer``, with a fresh shared secret) as child processes, and keeps them running until
interrupted.
With ``--demo`` it then acts as a first user would, over HTTP only: creates an API key, uploads scenes of the
proving ground's shapes world (images, a prompt and the objects in each; no model runs on the client) to sample
from and held-out scenes, asks for a loop of ``--rounds`` rounds on the seeing base (``dama/tiny-seeing-llava``):
each round the service samples pairs from the model, trains DAMA on them with the proving ground's settings and
evaluates; the demo follows it (a bar per stage, a line per round), prints hallucination (CHAIR) on the held-out
scenes, base -> each round, downloads the last round's adapter, and asks the base and the tuned model about one
held-out scene through the chat API (``/v1/chat/completions``), side by side. The same commands with
``DAMA_DATABASE_URL`` / ``DAMA_BROKER_URL`` use Postgres and Redis.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dama_engine.data import judge_response
from dama_engine.proving import IMAGE_SIZE, PAIRS, SCENES, TRAINING, DemoDataset, make_demo_dataset
from jobstore.db import make_engine, make_session_factory, session_scope
from jobstore.repository import create_api_key, get_or_create_tenant
from jobstore.settings import Settings
from jobstore.spec import SEEING_MODEL

TERMINAL = {"succeeded", "failed", "cancelled"}
DESCRIPTION_TOKENS = 40  # the proving ground's answer length (sampling and evaluation)
SIDE_BY_SIDE_SCENES = 16  # held-out scenes the demo asks both models about, to show one they answer differently


def _dama(*args: str) -> list[str]:
    """The ``dama`` console command, run with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "api.cli", *args]


def _start(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    log = (log_dir / f"{name}.log").open("ab")
    print(f"[serve] starting {name}: {' '.join(command[2:])} (log: {log_dir / (name + '.log')})", flush=True)
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class NotAnswering(RuntimeError):
    """A service process exited, or its URL did not answer 200 in time (the message ends with its log's tail)."""


def wait_until_answering(
    url: str, processes: Sequence[subprocess.Popen[Any]], *, timeout: float = 120.0, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200; raise :class:`NotAnswering` when a process of ``processes`` exits first or
    ``timeout`` seconds pass. Also what the tests and benchmarks use to wait for `dama api` and `dama infer`."""
    deadline = time.monotonic() + timeout

    def tail() -> str:
        return f":\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.is_file() else ""

    while True:
        for process in processes:
            if process.poll() is not None:
                raise NotAnswering(f"a service process exited early (code {process.returncode}){tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise NotAnswering(f"{url} did not answer within {timeout:.0f} s{tail()}")
        time.sleep(0.1)


def _wait_ready(base_url: str, processes: list[subprocess.Popen[bytes]], timeout: float = 120.0) -> None:
    try:
        wait_until_answering(f"{base_url}/readyz", processes, timeout=timeout)
    except NotAnswering as error:
        raise SystemExit(f"[serve] the API is not ready: {error}; see its log") from None


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


def _demo_training(steps: int | None) -> dict[str, Any]:
    """The proving ground's preference stage (:data:`dama_engine.proving.ground.TRAINING`: method, beta, filter
    width, learning rate, steps, batch, LoRA with the projector, all sent explicitly) as a job's fields."""
    return {
        "method": TRAINING["method"],
        "hyperparameters": {
            "beta": TRAINING["beta"],
            "filter_sigma": TRAINING["filter_sigma"],
            "learning_rate": TRAINING["learning_rate"],
            "batch_size": TRAINING["batch_size"],
            "max_steps": steps or TRAINING["steps"],
            "warmup_ratio": 0.1,
            "seed": 0,
            "max_length": 256,
        },
        "lora": {"r": TRAINING["lora_r"], "alpha": TRAINING["lora_alpha"], "dropout": 0.0, "train_projector": True},
    }


def demo_spec(datasets: dict[str, str], *, steps: int | None, scenes: int) -> dict[str, Any]:
    """A training job of the proving ground's preference stage on ``dama/tiny-seeing-llava`` (``datasets``:
    ``train`` pairs, ``eval`` held-out pairs, ``scenes`` a held-out generative set), evaluated on ``scenes``
    held-out scenes."""
    return {
        "model": SEEING_MODEL,
        "dataset_id": datasets["train"],
        **_demo_training(steps),
        "evaluation": {
            "dataset_id": datasets["eval"],
            "generative_dataset_id": datasets["scenes"],
            "max_samples": scenes,
            "max_new_tokens": DESCRIPTION_TOKENS,
        },
    }


def demo_loop_spec(
    sampled: str, held_out: str, *, rounds: int, steps: int | None, scenes: int, prompts: int | None
) -> dict[str, Any]:
    """The demo's loop: each round samples pairs from the seeing base (then from the previous round's adapter) on
    the ``sampled`` scenes as the proving ground samples its own (:data:`dama_engine.proving.ground.PAIRS`), trains
    the proving ground's preference stage on them, and evaluates on ``scenes`` held-out scenes. POPE is off: the
    seeing base was never taught to answer yes/no questions, so its POPE figures would measure nothing."""
    return {
        "model": SEEING_MODEL,
        "generative_dataset_id": sampled,
        "held_out_dataset_id": held_out,
        "rounds": rounds,
        "sampling": {
            "samples_per_prompt": PAIRS["samples"],
            "temperature": PAIRS["temperature"],
            "seed": PAIRS["seed"],
            "max_new_tokens": DESCRIPTION_TOKENS,
            "prompts_per_batch": 16,
            "max_prompts": prompts,
        },
        "training": _demo_training(steps),
        "evaluation": {
            "max_samples": scenes,
            "generation": {"max_new_tokens": DESCRIPTION_TOKENS},
            "pope": False,
            "batch_size": 16,
        },
    }


RUN_ROUTES = {"pair_generation": "pair-generations", "job": "jobs", "evaluation": "evaluations"}
FIGURES = (("CHAIR_i", "chair_i"), ("CHAIR_s", "chair_s"), ("coverage", "coverage"))


def _follow_loop(client: httpx.Client, loop: dict[str, Any]) -> dict[str, Any]:
    """A bar per stage (the current run's step of its total, its stage and ETA) and a line per finished round,
    until the loop ends; the ended loop."""
    from tqdm import tqdm

    bar: Any = None
    current, reported = None, 0
    try:
        while True:
            for entry in loop["rounds"][reported:]:
                if entry["metrics"] is None:
                    break
                reported += 1
                line = f"[demo] round {entry['round']}: {entry['pairs']} pairs; {_figures(entry['metrics'])}"
                (bar.write if bar is not None else print)(line)
            running = [
                (entry["round"], entry[name])
                for entry in loop["rounds"]
                for name in ("pair_generation", "job", "evaluation")
                if entry[name] is not None and entry[name]["status"] not in TERMINAL
            ]
            if running:
                number, brief = running[0]
                run = client.get(f"/{RUN_ROUTES[brief['object']]}/{brief['id']}").json()
                if brief["id"] != current:
                    if bar is not None:
                        bar.close()
                    current = brief["id"]
                    bar = tqdm(total=100, desc=f"round {number} {brief['object']}", dynamic_ncols=True)
                # Steps of a total where the run counts them (prompts, optimizer steps), else its percent.
                total, done = (run["total_steps"], run.get("step") or 0) if run.get("total_steps") else (100, 0)
                bar.total, bar.n = total, done or round(run.get("percent") or 0)
                eta = run.get("eta_seconds")
                eta_text = f"ETA {eta:.0f} s" if isinstance(eta, int | float) else ""
                bar.set_postfix_str(f"{run['status']} / {run.get('stage') or '-'} {eta_text}", refresh=False)
                bar.refresh()
            if loop["status"] in TERMINAL:
                return loop
            time.sleep(1.0)
            loop = client.get(f"/loops/{loop['id']}").json()
    finally:
        if bar is not None:
            bar.close()


def _figures(metrics: dict[str, Any] | None) -> str:
    values = metrics or {}
    return ", ".join(f"{label} {values[key]:.3f}" for label, key in FIGURES if isinstance(values.get(key), float))


def loop_lines(loop: dict[str, Any]) -> list[str]:
    """The demo's report from an ended loop: hallucination on the held-out scenes, base -> each round."""
    base, rounds = loop["base"] or {}, [entry for entry in loop["rounds"] if entry["metrics"]]
    if not rounds:
        return []
    evaluated = loop["spec"]["evaluation"]["max_samples"]
    lines = []
    for label, key in FIGURES:
        steps = " -> ".join(f"{entry['metrics'][key]:.3f}" for entry in rounds)
        lines.append(f"{label} {base[key]:.3f} -> {steps}")
    sampling = loop["spec"]["sampling"]
    pairs = ", ".join(str(entry["pairs"]) for entry in rounds)
    names = " -> ".join(f"round {entry['round']}" for entry in rounds)
    sampled = sampling["max_prompts"] or "all the"
    return [
        f"pairs per round: {pairs} (from {sampled} scenes sampled, {sampling['samples_per_prompt']} answers each)",
        f"hallucination on {evaluated} held-out scenes, base -> {names}: {'; '.join(lines)}",
    ]


def _chat(client: httpx.Client, model: str, image: bytes, prompt: str, *, wait_s: float = 120.0) -> str:
    """One greedy answer through ``/v1/chat/completions`` (the evaluation's settings), waiting for the inference
    backend while it starts."""
    url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
            }
        ],
        "max_tokens": DESCRIPTION_TOKENS,
        "temperature": 0,
    }
    deadline = time.monotonic() + wait_s
    while True:
        response = client.post("/v1/chat/completions", json=body)
        if response.status_code != 503 or time.monotonic() > deadline:
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"])
        time.sleep(1.0)


def held_out_scenes(folder: Path) -> DemoDataset:
    """The proving ground's held-out scenes as a generative set's files in ``folder`` (what the demo uploads)."""
    return make_demo_dataset(
        folder, n_train=0, n_eval=0, n_generative=SCENES["count"], image_size=IMAGE_SIZE, seed=SCENES["seed"]
    )


@dataclass(frozen=True)
class HeldOutScene:
    """A held-out scene as the demo keeps it for the side-by-side: its image, prompt and what is in it."""

    number: int
    image: bytes
    prompt: str
    objects: list[str]


def _marked(answer: str, scene: HeldOutScene, vocabulary: dict[str, Any]) -> str:
    judged = judge_response(answer, scene.objects, vocabulary)
    hallucinated = ", ".join(judged.hallucinated) or "none"
    return f"{answer!r} (hallucinated: {hallucinated})"


def side_by_side(
    client: httpx.Client, job_id: str, scenes: list[HeldOutScene], vocabulary: dict[str, Any], out_dir: Path
) -> list[str]:
    """The base and the tuned model answering held-out scenes through the chat API: the first scene where their
    answers differ (the first scene when none does), each answer's hallucinated objects marked with the CHAIR
    matcher, and the command to ask more."""
    answers: list[tuple[HeldOutScene, str, str]] = [
        (
            scene,
            _chat(client, SEEING_MODEL, scene.image, scene.prompt),
            _chat(client, job_id, scene.image, scene.prompt),
        )
        for scene in scenes
    ]
    scene, base, tuned = next((entry for entry in answers if entry[1] != entry[2]), answers[0])
    image = out_dir / f"held-out-scene-{scene.number}.png"
    image.write_bytes(scene.image)
    differ = sum(entry[1] != entry[2] for entry in answers)
    return [
        f"the base and the tuned model through {client.base_url}/v1/chat/completions: different answers on {differ} "
        f"of the first {len(scenes)} held-out scenes; scene {scene.number} ({', '.join(scene.objects)}), "
        f"{scene.prompt!r}:",
        f"  base  {SEEING_MODEL}: {_marked(base, scene, vocabulary)}",
        f"  tuned {job_id}: {_marked(tuned, scene, vocabulary)}",
        f"ask it yourself: dama chat --model {job_id} --image {image} {scene.prompt!r} --temperature 0",
    ]


def run_demo(
    base_url: str,
    settings: Settings,
    out_dir: Path,
    *,
    rounds: int = 1,
    steps: int | None = None,
    scenes: int | None = None,
    prompts: int | None = None,
) -> Path:
    """Act as a first user would, over HTTP only: upload scenes (images, prompts, what is in each) to sample from
    and held-out scenes, ask the service for a loop of ``rounds`` rounds on the seeing base (pairs sampled from the
    model on the server, a DAMA job on them, an evaluation), report hallucination base -> each round, download the
    last round's adapter."""
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
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        # Scenes of the shapes world as files: the images, a prompt, and the objects in each (no model involved).
        sampled = make_demo_dataset(
            folder / "sampled", n_train=0, n_eval=0, n_generative=PAIRS["scenes"], image_size=IMAGE_SIZE, seed=23
        )
        held_out = held_out_scenes(folder / "held-out")
        shown = [
            HeldOutScene(
                number + 1,
                (held_out.generative_eval.parent / row["image"]).read_bytes(),
                row["prompt"],
                list(row["objects"]),
            )
            for number, row in enumerate(
                json.loads(line) for line in held_out.generative_eval.read_text().splitlines()[:SIDE_BY_SIDE_SCENES]
            )
        ]
        vocabulary = json.loads(held_out.vocabulary.read_text())
        datasets = {
            "sampled": _upload(
                client, _archive(folder / "scenes.zip", sampled.generative_eval, sampled.vocabulary), "generative"
            ),
            "held_out": _upload(
                client,
                _archive(folder / "held-out-scenes.zip", held_out.generative_eval, held_out.vocabulary),
                "generative",
            ),
        }
    scenes = min(scenes or datasets["held_out"]["row_count"], datasets["held_out"]["row_count"])
    spec = demo_loop_spec(
        datasets["sampled"]["id"],
        datasets["held_out"]["id"],
        rounds=rounds,
        steps=steps,
        scenes=scenes,
        prompts=prompts,
    )
    response = client.post("/loops", json=spec, headers={"Idempotency-Key": f"demo-{int(time.time())}"})
    response.raise_for_status()
    loop = response.json()
    print(
        f"[demo] loop {loop['id']} of {rounds} round{'s' if rounds > 1 else ''} on {SEEING_MODEL}: each round "
        "samples pairs from the model on the server, trains DAMA on them and evaluates (the worker builds the model "
        f"on first use: stage building_model, about 1-2 min); follow it with GET {base_url}/loops/{loop['id']}",
        flush=True,
    )
    loop = _follow_loop(client, loop)
    if loop["status"] != "succeeded":
        raise SystemExit(f"[demo] loop {loop['status']}: {json.dumps(loop.get('error'))}")
    for line in loop_lines(loop):
        print(f"[demo] {line}", flush=True)
    job_id = loop["rounds"][-1]["job"]["id"]
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{job_id}-adapter.tar.gz"
    with client.stream("GET", f"/jobs/{job_id}/adapter") as download:
        download.raise_for_status()
        sha = download.headers.get("X-Content-SHA256", "")
        with archive.open("wb") as handle:
            for chunk in download.iter_bytes():
                handle.write(chunk)
    target = out_dir / f"{job_id}-adapter"
    with tarfile.open(archive) as bundle:
        bundle.extractall(target, filter="data")
    print(f"[demo] adapter of the last round: {target} (archive {archive}, sha256 {sha})", flush=True)
    for line in side_by_side(client, job_id, shown, vocabulary, out_dir):
        print(f"[demo] {line}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dama serve", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="run the demo job through the API once it is up")
    parser.add_argument("--demo-dir", default="runs/serve-demo", help="where the demo's adapter goes")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop the service when the demo is done")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the demo's loop (default 1)")
    parser.add_argument(
        "--demo-steps", type=int, default=None, help="optimizer steps per round (default: the proving ground's)"
    )
    parser.add_argument(
        "--demo-scenes", type=int, default=None, help="held-out scenes each round is scored on (default: all 300)"
    )
    parser.add_argument(
        "--demo-prompts", type=int, default=None, help="scenes each round samples pairs from (default: all 1,600)"
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
    if settings.inference_url is None:  # the chat routes' backend: our own, on this machine, behind a fresh secret
        env["DAMA_INFERENCE_URL"] = f"http://{settings.infer_host}:{settings.infer_port}/v1"
        env["DAMA_INFERENCE_SECRET"] = settings.inference_secret or secrets.token_urlsafe(32)
    processes = [
        _start("api", _dama("api"), env, log_dir),
        _start("worker", _dama("worker"), env, log_dir),
    ]
    if settings.inference_url is None:
        processes.append(_start("infer", _dama("infer"), env, log_dir))
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
            run_demo(
                base_url,
                settings,
                Path(args.demo_dir),
                rounds=args.rounds,
                steps=args.demo_steps,
                scenes=args.demo_scenes,
                prompts=args.demo_prompts,
            )
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
