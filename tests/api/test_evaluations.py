"""``/evaluations`` over HTTP, on the real API server and a real Celery worker consuming one queue of its own:
generative datasets, an evaluation followed to its metrics, outputs and chart, and the refusals."""

from __future__ import annotations

import io
import json
import secrets
import time
import zipfile
from typing import Any

import httpx
import pytest

from dama_engine.proving.shapes import make_demo_dataset
from tests.api.conftest import ApiServer, assert_error, upload

CHAIR_KEYS = {"chair_s", "chair_i", "coverage", "hallucination_rate", "mean_length"}
ENDED = {"succeeded", "failed", "cancelled"}


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def generative_members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    demo = make_demo_dataset(tmp_path_factory.mktemp("gen"), n_train=8, n_eval=8, n_generative=4)
    members = {
        "generative_eval.jsonl": demo.generative_eval.read_bytes(),
        "vocabulary.json": demo.vocabulary.read_bytes(),
    }
    for image in sorted(demo.images_dir.glob("gen_*")):
        members[f"images/{image.name}"] = image.read_bytes()
    return members


@pytest.fixture(scope="module")
def generative1(client1: httpx.Client, generative_members: dict[str, bytes]) -> dict[str, Any]:
    response = upload(client1, _zip(generative_members), "generative.zip", name="shapes-generative")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def eval_queue(worker_queue: str) -> str:
    """The session's worker (tests/api/conftest.py), shared with the pair generations' tests."""
    return worker_queue


def _follow(client: httpx.Client, evaluation_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/evaluations/{evaluation_id}").json()
        if body["status"] in ENDED:
            return body
        time.sleep(0.2)
    raise AssertionError(f"evaluation {evaluation_id} did not end within {timeout} s")


def test_a_generative_archive_is_stored_as_a_generative_dataset(generative1: dict[str, Any]) -> None:
    assert generative1["format"] == "generative"
    assert (generative1["row_count"], generative1["image_count"]) == (4, 4)
    assert generative1["validation"]["ok"] is True


def test_a_bad_generative_archive_is_refused_with_its_line(
    client1: httpx.Client, generative_members: dict[str, bytes]
) -> None:
    lines = generative_members["generative_eval.jsonl"].decode().splitlines()
    row = json.loads(lines[1])
    del row["objects"]
    lines[1] = json.dumps(row)
    members = {**generative_members, "generative_eval.jsonl": ("\n".join(lines) + "\n").encode()}
    error = assert_error(upload(client1, _zip(members), "bad.zip"), 422, "invalid_rows")
    assert "row 2, objects" in error["message"]
    assert error["errors"] == [
        {
            "row": 2,
            "field": "objects",
            "code": "invalid_generative_row",
            "reason": "missing or not a list of object names",
        }
    ]


def test_an_evaluation_runs_to_its_metrics_outputs_and_chart(
    client1: httpx.Client,
    client2: httpx.Client,
    dataset1: dict[str, Any],
    generative1: dict[str, Any],
    eval_queue: str,
) -> None:
    body = {
        "model": "dama/tiny-llava",
        "preference_dataset_id": dataset1["id"],
        "generative_dataset_id": generative1["id"],
        "generation": {"max_new_tokens": 8},
        "max_length": 256,
        "queue": eval_queue,
    }
    key = {"Idempotency-Key": f"eval-{secrets.token_hex(4)}"}
    created = client1.post("/evaluations", json=body, headers=key)
    assert created.status_code == 201, created.text
    evaluation = created.json()
    assert evaluation["id"].startswith("eval_") and evaluation["object"] == "evaluation"
    assert evaluation["status"] == "queued" and evaluation["metrics"] is None
    replay = client1.post("/evaluations", json=body, headers=key)
    assert replay.status_code == 200 and replay.json()["id"] == evaluation["id"]
    evaluation_id = evaluation["id"]

    finished = _follow(client1, evaluation_id)
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["percent"] == 100.0 and finished["error"] is None
    metrics = finished["metrics"]
    assert set(metrics["generative"]["base"]) >= CHAIR_KEYS and metrics["generative"]["tuned"] is None
    assert metrics["generative"]["samples"] == 4
    preference = metrics["preference"]
    assert preference["pairs"] == 6 and set(preference["base"]["overall"]) >= {"logp_accuracy", "logp_margin"}
    assert preference["tuned"] is None and preference["implicit_reward"] is None

    events = client1.get(f"/evaluations/{evaluation_id}/events").json()["data"]
    stages = [event["data"]["stage"] for event in events if event["type"] == "stage"]
    assert stages == ["validating", "loading_model", "log_probs", "generating", "writing"]

    outputs = client1.get(f"/evaluations/{evaluation_id}/outputs")
    assert outputs.status_code == 200 and outputs.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in outputs.text.splitlines()]
    assert len(rows) == 4
    assert {"prompt", "objects", "base"} <= set(rows[0])
    assert {"response", "mentioned", "hallucinated", "covered", "missed"} <= set(rows[0]["base"])
    pairs = client1.get(f"/evaluations/{evaluation_id}/outputs", params={"file": "pairs"})
    assert pairs.status_code == 200 and len(pairs.text.splitlines()) == 6
    chart = client1.get(f"/evaluations/{evaluation_id}/chart")
    assert chart.status_code == 200 and chart.headers["content-type"] == "image/png"
    assert chart.content.startswith(b"\x89PNG\r\n\x1a\n")

    # Another tenant sees nothing; training-job routes do not serve evaluations.
    for path in ("", "/outputs", "/chart", "/events"):
        assert_error(client2.get(f"/evaluations/{evaluation_id}{path}"), 404)
    assert_error(client1.get(f"/jobs/{evaluation_id}"), 404, "job_not_found")
    assert_error(client1.get(f"/jobs/{evaluation_id}/events"), 404)
    listed = [item["id"] for item in client1.get("/evaluations").json()["data"]]
    assert evaluation_id in listed
    assert evaluation_id not in [item["id"] for item in client1.get("/jobs", params={"limit": 100}).json()["data"]]
    assert evaluation_id not in [item["id"] for item in client2.get("/evaluations").json()["data"]]
    assert_error(client1.post(f"/evaluations/{evaluation_id}/cancel"), 409, "evaluation_not_cancellable")


def test_evaluation_requests_are_checked(
    client1: httpx.Client, client2: httpx.Client, dataset1: dict[str, Any], generative1: dict[str, Any]
) -> None:
    base = {"model": "dama/tiny-llava"}
    error = assert_error(client1.post("/evaluations", json=base), 422, "validation_error")
    assert "nothing to evaluate" in error["message"]
    error = assert_error(
        client2.post("/evaluations", json={**base, "generative_dataset_id": generative1["id"]}),
        404,
        "dataset_not_found",
    )
    assert error["param"] == "generative_dataset_id"
    error = assert_error(
        client1.post("/evaluations", json={**base, "generative_dataset_id": dataset1["id"]}),
        422,
        "dataset_not_generative",
    )
    assert error["param"] == "generative_dataset_id"
    error = assert_error(
        client1.post("/evaluations", json={**base, "preference_dataset_id": generative1["id"]}),
        422,
        "dataset_is_generative",
    )
    assert error["param"] == "preference_dataset_id"
    # A misspelled built-in model is refused at once, as for jobs and pair generations (not minutes later).
    misspelled = {"model": "dama/tiny-lava", "generative_dataset_id": generative1["id"]}
    error = assert_error(client1.post("/evaluations", json=misspelled), 400, "unknown_model")
    assert error["param"] == "model" and "did you mean 'dama/tiny-llava'" in error["message"]

    # A training job that has not succeeded (no worker consumes the server's queue: it stays queued).
    training = client1.post("/jobs", json={"model": "dama/tiny-llava", "dataset_id": dataset1["id"]})
    assert training.status_code == 201, training.text
    training_id = training.json()["id"]
    error = assert_error(
        client1.post(
            "/evaluations",
            json={**base, "adapter_job_id": training_id, "generative_dataset_id": generative1["id"]},
        ),
        409,
        "adapter_not_ready",
    )
    assert error["param"] == "adapter_job_id"
    error = assert_error(
        client2.post("/evaluations", json={**base, "adapter_job_id": training_id, "preference_dataset_id": "ds_x"}),
        404,
    )
    assert_error(client1.get(f"/evaluations/{training_id}"), 404, "evaluation_not_found")
    assert client1.post(f"/jobs/{training_id}/cancel").status_code == 200

    # Training specs: a generative set is only an evaluation.generative_dataset_id.
    job = {"model": "dama/tiny-llava", "dataset_id": generative1["id"]}
    assert_error(client1.post("/jobs", json=job), 422, "dataset_is_generative")
    job = {
        "model": "dama/tiny-llava",
        "dataset_id": dataset1["id"],
        "evaluation": {"generative_dataset_id": dataset1["id"]},
    }
    error = assert_error(client1.post("/jobs", json=job), 422, "dataset_not_generative")
    assert error["param"] == "evaluation.generative_dataset_id"


def test_outputs_wait_for_success_and_a_queued_evaluation_cancels(
    client1: httpx.Client, generative1: dict[str, Any]
) -> None:
    # The server's own queue has no worker: the evaluation stays queued.
    created = client1.post(
        "/evaluations", json={"model": "dama/tiny-llava", "generative_dataset_id": generative1["id"]}
    )
    assert created.status_code == 201, created.text
    evaluation_id = created.json()["id"]
    assert_error(client1.get(f"/evaluations/{evaluation_id}/outputs"), 409, "evaluation_not_ready")
    assert_error(client1.get(f"/evaluations/{evaluation_id}/chart"), 409, "evaluation_not_ready")
    cancelled = client1.post(f"/evaluations/{evaluation_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_the_openapi_document_describes_evaluations(api_server: ApiServer) -> None:
    document = httpx.get(f"{api_server.url}/openapi.json").json()
    assert {"/evaluations", "/evaluations/{evaluation_id}/outputs", "/evaluations/{evaluation_id}/chart"} <= set(
        document["paths"]
    )
    schema = document["components"]["schemas"]["EvaluationCreate"]
    for name, field in schema["properties"].items():
        assert field.get("description") or "$ref" in field or "allOf" in field, name
