"""``/pair-generations`` over HTTP, on the real API server and the session's real Celery worker (tests/api/conftest.py),
with the built-in random tiny LLaVA: a run through the SDK to a dataset a job accepts at once (chosen answers
faithful and rejected ones hallucinating by the test's own matcher run), a run where no prompt yields a pair
followed to its failure by ``dama pairs generate --follow``, and the refusals of bad input with the field at fault.
The worker side (a kill before the dataset is recorded): tests/worker/test_pair_generation_jobs.py."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from dama_client import Client
from dama_engine.data import judge_response
from dama_engine.data.matcher import Vocabulary
from tests.api.conftest import JUDGE, LIMITED_MAX_PROMPTS, ROOT, ApiServer, assert_error, dataset_count, upload
from tests.engine.test_pairs import _generative_set

# Objects the random model never names.
NO_PAIR_VOCABULARY: dict[str, list[str]] = {"red zeppelin": [], "blue walrus": []}


def _archive(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def _upload_set(client: httpx.Client, folder: Path, **kwargs: Any) -> dict[str, Any]:
    _generative_set(folder, **kwargs)
    response = upload(client, _archive(folder), "generative.zip", format="generative")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["format"] == "generative"
    return body


@pytest.fixture(scope="module")
def prompts_set(client1: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """6 prompts on 3 images, objects named from the tiny tokenizer's nouns: the random model's samples make pairs."""
    return _upload_set(client1, tmp_path_factory.mktemp("pairs-set"), prompts=6)


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory: pytest.TempPathFactory) -> Vocabulary:
    folder = tmp_path_factory.mktemp("pairs-vocabulary")
    return Vocabulary.load(_generative_set(folder, prompts=1)[1])


def _spec(dataset_id: str, **values: Any) -> dict[str, Any]:
    return {"model": "dama/tiny-llava", "generative_dataset_id": dataset_id, **values}


def test_requests_are_checked_with_the_field_at_fault(
    api_server: ApiServer,
    limited_server: ApiServer,
    key1: str,
    client1: httpx.Client,
    client2: httpx.Client,
    dataset1: dict[str, Any],
    dataset2: dict[str, Any],
    prompts_set: dict[str, Any],
) -> None:
    set_id = prompts_set["id"]
    refusals = [
        (client1, _spec(dataset1["id"]), 422, "dataset_not_generative", "generative_dataset_id"),
        (client1, _spec(set_id, model="dama/tiny-lava"), 400, "unknown_model", "model"),
        (client2, _spec(set_id), 404, "dataset_not_found", "generative_dataset_id"),
        (client1, _spec(set_id, samples_per_prompt=65), 422, "samples_over_limit", "samples_per_prompt"),
        (client1, _spec(set_id, samples_per_prompt=1), 422, "validation_error", "samples_per_prompt"),
        (client1, _spec(set_id, max_prompts=10_001), 422, "prompts_over_limit", "max_prompts"),
        (client1, _spec(set_id, temperature=0), 422, "validation_error", "temperature"),
        (client1, _spec(set_id, init_adapter="job_x:nope"), 422, "validation_error", "init_adapter"),
    ]
    for client, body, status, code, param in refusals:
        assert assert_error(client.post("/pair-generations", json=body), status, code)["param"] == param, body

    # The set has more prompts than the limited server allows: 400 unless max_prompts asks for few enough.
    with limited_server.client(key1) as limited:
        error = assert_error(limited.post("/pair-generations", json=_spec(set_id)), 400, "prompts_over_limit")
        assert error["param"] == "max_prompts" and f"at most {LIMITED_MAX_PROMPTS}" in error["message"]

    # Starting adapters follow the init_adapter rules: this tenant's job (404 otherwise), on the same base (422).
    theirs = client2.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset2["id"]}).json()["id"]
    ours = client1.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset1["id"]}).json()["id"]
    error = assert_error(client1.post("/pair-generations", json=_spec(set_id, init_adapter=theirs)), 404)
    assert error["param"] == "init_adapter"
    other_base = _spec(set_id, model="dama/tiny-qwen2-vl", init_adapter=f"{ours}:4")
    error = assert_error(client1.post("/pair-generations", json=other_base), 422, "init_adapter_mismatch")
    assert error["param"] == "init_adapter"
    assert client2.post(f"/jobs/{theirs}/cancel").status_code == 200
    assert client1.post(f"/jobs/{ours}/cancel").status_code == 200

    # Queued on the server's own queue (no worker): idempotent, not a job, outputs wait, cancelled at once.
    key = {"Idempotency-Key": f"pairs-{secrets.token_hex(4)}"}
    created = client1.post("/pair-generations", json=_spec(set_id), headers=key)
    assert created.status_code == 201, created.text
    run = created.json()
    assert run["id"].startswith("pgen_") and run["object"] == "pair_generation" and run["status"] == "queued"
    assert run["dataset_id"] is None and run["spec"]["samples_per_prompt"] == 8
    assert client1.post("/pair-generations", json=_spec(set_id), headers=key).json()["id"] == run["id"]
    assert_error(client1.get(f"/pair-generations/{run['id']}/outputs"), 409, "pair_generation_not_ready")
    assert_error(client1.get(f"/jobs/{run['id']}"), 404, "job_not_found")
    assert_error(client2.get(f"/pair-generations/{run['id']}"), 404, "pair_generation_not_found")
    assert run["id"] in [item["id"] for item in client1.get("/pair-generations").json()["data"]]
    assert client1.post(f"/pair-generations/{run['id']}/cancel").json()["status"] == "cancelled"
    assert_error(client1.post(f"/pair-generations/{run['id']}/cancel"), 409, "pair_generation_not_cancellable")


def test_a_prompt_set_needs_a_judge_of_the_service(
    client1: httpx.Client, prompts_set: dict[str, Any], tmp_path: Path
) -> None:
    """A prompt set (images and prompts, no objects) is told apart at upload; a pair generation on it must name a
    judge of the service; a set with objects must not; jobs and evaluations refuse it (they need the objects)."""
    folder = tmp_path / "unlabelled"
    data, _ = _generative_set(folder, prompts=4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "objects"}) + "\n" for row in rows))
    response = upload(client1, _archive(folder), "unlabelled.zip")
    assert response.status_code == 201, response.text
    unlabelled = response.json()
    assert unlabelled["format"] == "prompts" and unlabelled["row_count"] == 4

    refusals = [
        ("/pair-generations", _spec(unlabelled["id"]), 400, "judge_required", "judge", JUDGE),
        ("/pair-generations", _spec(unlabelled["id"], judge="listr"), 400, "unknown_judge", "judge", "did you mean"),
        ("/pair-generations", _spec(prompts_set["id"], judge=JUDGE), 400, "judge_not_needed", "judge", "leave judge"),
        ("/pair-generations", _spec(unlabelled["id"], judge="no spaces"), 422, "validation_error", "judge", ""),
        (
            "/jobs",
            {"model": "dama/tiny-llava", "dataset_id": unlabelled["id"]},
            422,
            "dataset_is_generative",
            "dataset_id",
            "a prompt set",
        ),
        (
            "/evaluations",
            {"model": "dama/tiny-llava", "generative_dataset_id": unlabelled["id"]},
            422,
            "dataset_not_generative",
            "generative_dataset_id",
            "a prompt set",
        ),
    ]
    for path, body, status, code, param, words in refusals:
        error = assert_error(client1.post(path, json=body), status, code)
        assert error["param"] == param and words in error["message"], (body, error)

    created = client1.post("/pair-generations", json=_spec(unlabelled["id"], judge=JUDGE))
    assert created.status_code == 201, created.text
    run = created.json()
    assert run["spec"]["judge"] == JUDGE and run["status"] == "queued"
    assert client1.post(f"/pair-generations/{run['id']}/cancel").json()["status"] == "cancelled"


def test_a_pair_generation_makes_a_dataset_that_a_job_takes_at_once(
    api_server: ApiServer,
    key1: str,
    client1: httpx.Client,
    client2: httpx.Client,
    prompts_set: dict[str, Any],
    vocabulary: Vocabulary,
    worker_queue: str,
) -> None:
    with Client(api_server.url, key1) as sdk:
        run = sdk.pair_generations.create(
            model="dama/tiny-llava",
            generative_dataset_id=prompts_set["id"],
            samples_per_prompt=6,
            max_new_tokens=24,
            seed=3,
            prompts_per_batch=3,
            dataset_name="round 1",
            queue=worker_queue,
        )
        updates = list(sdk.pair_generations.follow(run.id, interval=0.5))
        run = updates[-1].job
        assert run.status == "succeeded", run.error
        events = [event for update in updates for event in update.events]
        samples = [json.loads(line) for line in sdk.pair_generations.outputs(run.id).splitlines()]
        report = json.loads(sdk.pair_generations.outputs(run.id, file="report"))
        assert sdk.pair_generations.outputs(run.id, file="chart").startswith(b"\x89PNG\r\n\x1a\n")
    assert (run.step, run.total_steps, run.percent) == (6, 6, 100.0) and run.dataset_id is not None
    assert [event.data["stage"] for event in events if event.type == "stage" and event.data] == [
        "validating",
        "loading_model",
        "generating",
        "writing",
    ]
    assert run.report is not None and report["pairs"] == run.report["pairs"] > 0 and report["samples"] == 36

    # Every sample with its judgement; a pair's chosen answer is faithful and its rejected one hallucinates, by
    # this test's own matcher run against the objects the sample file names.
    assert len(samples) == 36
    roles = [sample for sample in samples if sample["role"] is not None]
    assert len(roles) == 2 * report["pairs"]
    for sample in roles:
        judged = judge_response(sample["response"], sample["objects"], vocabulary)
        assert bool(judged.hallucinated) == (sample["role"] == "rejected"), sample

    # An ordinary dataset of this tenant, usable by POST /jobs at once; nobody else's.
    dataset = client1.get(f"/datasets/{run.dataset_id}").json()
    assert (dataset["name"], dataset["format"], dataset["row_count"]) == ("round 1", "trl", report["pairs"])
    assert dataset["validation"]["ok"] is True
    job = client1.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": run.dataset_id})
    assert job.status_code == 201, job.text
    assert client1.post(f"/jobs/{job.json()['id']}/cancel").status_code == 200
    assert_error(client2.get(f"/datasets/{run.dataset_id}"), 404)
    assert_error(client2.get(f"/pair-generations/{run.id}/outputs"), 404)

    # The events again, as the live stream a browser follows: it ends, the run having ended.
    with client1.stream("GET", f"/pair-generations/{run.id}/events", headers={"Accept": "text/event-stream"}) as stream:
        streamed = [line for line in stream.iter_lines() if line.startswith("event: ")]
    assert streamed.count("event: stage") == 4 and streamed[-1] == "event: status"


def test_no_pair_from_any_prompt_fails_as_a_user_error_followed_by_the_cli(
    api_server: ApiServer,
    key1: str,
    client1: httpx.Client,
    db: sessionmaker[Session],
    worker_queue: str,
    tmp_path: Path,
) -> None:
    no_pairs = _upload_set(client1, tmp_path / "set", prompts=2, vocabulary=NO_PAIR_VOCABULARY)
    datasets = dataset_count(db)
    env = {**api_server.env, "DAMA_API_URL": api_server.url, "DAMA_API_KEY": key1}
    command = ["pairs", "generate", "--model", "dama/tiny-llava", "--dataset", no_pairs["id"], "--samples", "2"]
    command += ["--set", "max_new_tokens=8", "--set", f"queue={worker_queue}", "--follow"]
    followed = subprocess.run(
        [sys.executable, "-m", "api.cli", *command],
        cwd=ROOT,
        env={**env, "COLUMNS": "100", "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert followed.returncode == 1, followed.stdout + followed.stderr
    assert "status: failed" in followed.stdout and "no pairs: 2 prompts tried with 2 samples each" in followed.stdout
    assert "[stage] stage generating" in followed.stderr  # the events above the progress bar
    run_id = followed.stderr.split("created ", 1)[1].split()[0]
    run = client1.get(f"/pair-generations/{run_id}").json()
    assert run["status"] == "failed" and run["error"]["kind"] == "user_error" and run["dataset_id"] is None
    assert "samples_per_prompt" in run["error"]["message"] and "temperature" in run["error"]["message"]
    assert dataset_count(db) == datasets
