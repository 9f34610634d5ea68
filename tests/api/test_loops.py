"""``/loops`` over HTTP, on the real API server and a real Celery worker of this module's own (its queue, short
heartbeats): a 2-round loop on the built-in random tiny LLaVA followed with the SDK to its end, its worker
SIGKILLed while round 2 samples its pairs; the loop still finishes, with every stage started once (the killed
stage re-run by the next worker, its attempt counted). Also: each round's runs chained by their starting adapter,
per-round metrics, the loop's events and ``loop.*`` webhooks, ``dama loops`` on the command line, cancelling, and
the refusals with the field at fault. The job-store mechanics on both databases: tests/jobstore/test_loops.py."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dama_client import Client
from jobstore.settings import Settings
from tests.api.conftest import ROOT, ApiServer, assert_error
from tests.api.test_pair_generations import _upload_set
from tests.worker.conftest import WorkerProcess
from worker.engine_config import ensure_tiny_model, model_cache_root

STAGE_OBJECTS = ("pair_generation", "job", "evaluation")


@pytest.fixture(scope="module")
def sampled_set(client1: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """6 prompts whose random-model samples make pairs (tests/api/test_pair_generations.py)."""
    return _upload_set(client1, tmp_path_factory.mktemp("loop-set"), prompts=6)


@pytest.fixture(scope="module")
def held_out_set(client1: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _upload_set(client1, tmp_path_factory.mktemp("loop-held-out"), prompts=4)


@pytest.fixture(scope="module")
def loop_worker_settings(api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A worker's settings on the API server's database and store, with a queue of its own and heartbeats short
    enough for its sweeper to recover a killed worker's run in seconds."""
    home = tmp_path_factory.mktemp("loop-worker")
    settings = Settings(
        home=home,
        database_url=api_server.env["DAMA_DATABASE_URL"],
        broker_url=api_server.env["DAMA_BROKER_URL"],
        artifacts_dir=api_server.artifacts,
        model_cache_dir=home / "models",
        default_queue=f"test-loops-{secrets.token_hex(4)}",
        metrics_flush_s=0.25,
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=4.0,
        sweep_interval_s=1.0,
    )
    ensure_tiny_model("llava", model_cache_root(settings))  # built once, not inside the timed runs
    yield settings
    redis.Redis.from_url(settings.broker_url).delete(settings.default_queue)


def _loop_spec(sampled: str, held_out: str, queue: str | None = None, **values: Any) -> dict[str, Any]:
    """Two rounds of: 6 samples of 24 tokens per prompt (seed 3: the random model's samples make pairs), 2 DAMA
    steps, an evaluation on 4 held-out prompts."""
    spec: dict[str, Any] = {
        "model": "dama/tiny-llava",
        "generative_dataset_id": sampled,
        "held_out_dataset_id": held_out,
        "rounds": 2,
        "sampling": {"samples_per_prompt": 6, "max_new_tokens": 24, "seed": 3, "prompts_per_batch": 3},
        "training": {"method": "dama", "hyperparameters": {"max_steps": 2, "batch_size": 3}},
        "evaluation": {"max_samples": 4, "generation": {"max_new_tokens": 12}},
        **values,
    }
    if queue is not None:
        spec["queue"] = queue
    return spec


def _wait(predicate: Any, *, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return value


def test_a_two_round_loop_survives_a_worker_killed_in_round_two(
    api_server: ApiServer,
    key1: str,
    client1: httpx.Client,
    client2: httpx.Client,
    sampled_set: dict[str, Any],
    held_out_set: dict[str, Any],
    loop_worker_settings: Settings,
    tmp_path: Path,
) -> None:
    settings, queue = loop_worker_settings, loop_worker_settings.default_queue
    hook = client1.post("/webhooks", json={"url": "https://hooks.example.com/loops"})
    assert hook.status_code == 201, hook.text
    first = WorkerProcess(settings, queue, tmp_path, "loops1")
    second: WorkerProcess | None = None
    try:
        with Client(api_server.url, key1) as sdk:
            loop = sdk.loops.create(**_loop_spec(sampled_set["id"], held_out_set["id"], queue))
            assert (
                loop.status == "running"
                and loop.total_steps == 6
                and [r.status for r in loop.rounds]
                == [
                    "running",
                    "pending",
                ]
            )

            def round_two_sampling() -> str | None:
                current = sdk.loops.get(loop.id).rounds[1].pair_generation
                return current["id"] if current and current["status"] == "running" else None

            killed_run = _wait(round_two_sampling, timeout=150, what="round 2's pair generation to run")
            first.kill()  # SIGKILL while round 2 samples: its run stays running, its heartbeats stop
            second = WorkerProcess(settings, queue, tmp_path, "loops2")  # its sweeper re-queues the silent run
            ended = sdk.loops.wait(loop.id, timeout=240, interval=0.5)
            assert ended.status == "succeeded", (ended.error, second.log())
            events = list(sdk.loops.events(loop.id))
    finally:
        first.stop()
        if second is not None:
            second.stop()

    # Every stage started once, and each run once but the killed one, which the second worker ran again.
    runs = [(entry.round, name, entry.model_dump()[name]) for entry in ended.rounds for name in STAGE_OBJECTS]
    assert all(run is not None and run["status"] == "succeeded" for _, _, run in runs), runs
    ids = [run["id"] for _, _, run in runs]
    assert len(set(ids)) == 6
    attempts = {run["id"]: run["attempts"] for _, _, run in runs}
    assert attempts.pop(killed_run) == 2 and set(attempts.values()) == {1}, attempts
    queued = [event.data["run_id"] for event in events if event.type == "stage" and event.data]
    assert queued == ids, "each stage's run queued once, in order"
    assert [event.data["round"] for event in events if event.type == "round" and event.data] == [1, 2]
    assert ended.step == ended.total_steps == 6 and ended.percent == 100.0

    # Round 2 sampled from round 1's adapter and trained it further; each round evaluated its own job.
    round1, round2 = ended.rounds
    assert round1.job is not None and round2.job is not None and round2.pair_generation is not None
    sampled = client1.get(f"/pair-generations/{round2.pair_generation['id']}").json()
    assert sampled["spec"]["init_adapter"] == round1.job["id"]
    trained = client1.get(f"/jobs/{round2.job['id']}").json()
    assert trained["spec"]["init_adapter"] == round1.job["id"] and trained["dataset_id"] == round2.dataset_id
    for entry in ended.rounds:
        assert entry.pairs is not None and entry.pairs > 0 and entry.dataset_id is not None
        assert entry.evaluation is not None and entry.job is not None
        evaluation = client1.get(f"/evaluations/{entry.evaluation['id']}").json()
        assert evaluation["spec"]["adapter_job_id"] == entry.job["id"]
        tuned = evaluation["metrics"]["generative"]["tuned"]
        assert entry.metrics is not None and entry.metrics["chair_i"] == tuned["chair_i"]
        assert 0.0 <= entry.metrics["pope_f1"] <= 1.0
    assert ended.base is not None and set(ended.base) >= {"chair_i", "chair_s", "coverage", "pope_f1"}

    # Webhooks: the loop's start, its two rounds and its end, in order.
    deliveries = client1.get(f"/webhooks/{hook.json()['id']}/deliveries", params={"limit": 100}).json()["data"]
    assert client1.delete(f"/webhooks/{hook.json()['id']}").status_code == 204  # the tenant's other tests count theirs
    loop_events = [item["event_type"] for item in reversed(deliveries) if item["event_type"].startswith("loop.")]
    assert loop_events == ["loop.running", "loop.round_completed", "loop.round_completed", "loop.succeeded"]

    # Another tenant sees nothing of it; the command line shows it.
    assert_error(client2.get(f"/loops/{loop.id}"), 404, "loop_not_found")
    assert loop.id not in [item["id"] for item in client2.get("/loops").json()["data"]]
    env = {**os.environ, "DAMA_API_URL": api_server.url, "DAMA_API_KEY": key1}
    shown = subprocess.run(
        [sys.executable, "-m", "api.cli", "loops", "show", loop.id],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "round 1: succeeded:" in shown.stdout and "round 2: succeeded:" in shown.stdout and "CHAIR_i" in shown.stdout


def test_a_cancelled_loop_cancels_its_queued_run(
    client1: httpx.Client, sampled_set: dict[str, Any], held_out_set: dict[str, Any]
) -> None:
    # The server's own queue has no worker: round 1's pair generation stays queued.
    created = client1.post("/loops", json=_loop_spec(sampled_set["id"], held_out_set["id"]))
    assert created.status_code == 201, created.text
    loop = created.json()
    assert loop["id"].startswith("loop_") and loop["object"] == "loop"
    pairs = loop["rounds"][0]["pair_generation"]
    assert pairs["status"] == "queued" and pairs["object"] == "pair_generation"
    cancelled = client1.post(f"/loops/{loop['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert client1.get(f"/pair-generations/{pairs['id']}").json()["status"] == "cancelled"
    assert_error(client1.post(f"/loops/{loop['id']}/cancel"), 409, "loop_not_cancellable")
    listed = client1.get("/loops", params={"status": "cancelled"}).json()["data"]
    assert loop["id"] in [item["id"] for item in listed]


def test_loop_requests_are_checked_with_the_field_at_fault(
    client1: httpx.Client,
    client2: httpx.Client,
    dataset1: dict[str, Any],
    sampled_set: dict[str, Any],
    held_out_set: dict[str, Any],
) -> None:
    sampled, held_out = sampled_set["id"], held_out_set["id"]
    no_lora = {"method": "dama", "lora": {"enabled": False}}
    refusals = [
        (client1, _loop_spec(sampled, held_out, rounds=6), 422, "rounds_over_limit", "rounds"),
        (client1, _loop_spec(sampled, held_out, rounds=0), 422, "validation_error", "rounds"),
        (client1, _loop_spec(sampled, held_out, model="dama/tiny-lava"), 400, "unknown_model", "model"),
        (client1, _loop_spec(sampled, sampled), 422, "held_out_is_sampled", "held_out_dataset_id"),
        (client1, _loop_spec(dataset1["id"], held_out), 422, "dataset_not_generative", "generative_dataset_id"),
        (client1, _loop_spec(sampled, dataset1["id"]), 422, "dataset_not_generative", "held_out_dataset_id"),
        (client2, _loop_spec(sampled, held_out), 404, "dataset_not_found", "generative_dataset_id"),
        (client1, _loop_spec(sampled, held_out, training=no_lora), 422, "rounds_need_lora", "training.lora.enabled"),
        (
            client1,
            _loop_spec(sampled, held_out, sampling={"samples_per_prompt": 65}),
            422,
            "samples_over_limit",
            "sampling.samples_per_prompt",
        ),
        (
            client1,
            _loop_spec(sampled, held_out, sampling={"temperature": 0}),
            422,
            "validation_error",
            "sampling.temperature",
        ),
        (client1, _loop_spec(sampled, held_out, init_adapter="job_nope"), 404, "job_not_found", "init_adapter"),
    ]
    for client, body, status, code, param in refusals:
        assert assert_error(client.post("/loops", json=body), status, code)["param"] == param, body


def test_dama_loops_create_follows_a_loop_to_its_end(
    api_server: ApiServer,
    key1: str,
    sampled_set: dict[str, Any],
    held_out_set: dict[str, Any],
    loop_worker_settings: Settings,
    tmp_path: Path,
) -> None:
    """``dama loops create --follow``: a bar per stage on stderr, a line per finished round, then the base's and
    each round's figures; exit 0 once it succeeded."""
    settings = loop_worker_settings
    env = {**os.environ, "DAMA_API_URL": api_server.url, "DAMA_API_KEY": key1}
    command = [sys.executable, "-m", "api.cli", "loops", "create", "--model", "dama/tiny-llava"]
    command += ["--dataset", sampled_set["id"], "--held-out", held_out_set["id"], "--rounds", "1", "--follow"]
    spec = _loop_spec(sampled_set["id"], held_out_set["id"], settings.default_queue)
    command += ["--spec", json.dumps({"sampling": spec["sampling"], "queue": spec["queue"]})]
    command += ["--set", "training.method=dama", "--set", "training.hyperparameters.max_steps=2"]
    command += ["--set", "training.hyperparameters.batch_size=3", "--set", "evaluation.max_samples=4"]
    command += ["--set", "evaluation.generation.max_new_tokens=12"]
    worker = WorkerProcess(settings, settings.default_queue, tmp_path, "loops-cli")
    try:
        followed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        worker.stop()
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "round 1 pair_generation" in followed.stderr and "round 1 evaluation" in followed.stderr  # the bars
    assert "round 1: " in followed.stderr and "pairs; CHAIR_i" in followed.stderr  # the round's line
    lines = dict(line.split(": ", 1) for line in followed.stdout.splitlines() if ": " in line)
    assert lines["status"] == "succeeded" and lines["round 1"].startswith("succeeded: ") and "CHAIR_i" in lines["base"]
