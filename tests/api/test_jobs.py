"""``/jobs``: create (row committed, message in the Redis queue), validation with field paths, idempotency,
cancellation, listing, tenant isolation, and a broker that is down."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repository
from tests.api.conftest import ApiServer, assert_error


def _spec(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    return {"model": "dama/tiny-llava", "dataset_id": dataset_id, "hyperparameters": {"max_steps": 4}} | overrides


def test_create_job_commits_it_and_enqueues_it(
    client1: httpx.Client, dataset1: dict[str, Any], api_server: ApiServer, redis_url: str
) -> None:
    queue = redis.Redis.from_url(redis_url)
    before = queue.llen(api_server.queue)
    response = client1.post("/jobs", json=_spec(dataset1["id"], method="dpo"))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_")
    assert (job["status"], job["queue"], job["dataset_id"], job["attempts"]) == (
        "queued",
        api_server.queue,
        dataset1["id"],
        0,
    )
    assert (job["progress"], job["percent"], job["error"], job["result"]) == (0.0, 0.0, None, None)
    assert job["spec"]["method"] == "dpo" and job["spec"]["hyperparameters"]["max_steps"] == 4
    assert job["spec"]["lora"]["r"] == 16  # defaults filled in
    assert job["created_at"].endswith("Z") and job["started_at"] is None
    assert queue.llen(api_server.queue) == before + 1  # Celery's Redis transport: a list named after the queue
    assert client1.get(f"/jobs/{job['id']}").json() == job


def test_the_spec_queue_overrides_the_default(client1: httpx.Client, dataset1: dict[str, Any], redis_url: str) -> None:
    queue_name = f"{dataset1['id'].lower()}-own-queue"
    try:
        job = client1.post("/jobs", json=_spec(dataset1["id"], queue=queue_name)).json()
        assert job["queue"] == queue_name
        assert redis.Redis.from_url(redis_url).llen(queue_name) == 1
    finally:
        redis.Redis.from_url(redis_url).delete(queue_name)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"target_modules": ["q_proj", 3]}}, "lora.target_modules[1]"),
        ({"method": "ppo"}, "method"),
        ({"model": ""}, "model"),
        ({"gpus": 0}, "gpus"),
        ({"queue": "Not A Queue!"}, "queue"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"evaluation": {"dataset_id": "ds_x", "holdout_fraction": 0.1}}, "evaluation"),
    ],
)
def test_invalid_specs_are_422_with_the_field_path(
    change: dict[str, Any], param: str, client1: httpx.Client, dataset1: dict[str, Any]
) -> None:
    error = assert_error(client1.post("/jobs", json=_spec(dataset1["id"]) | change), 422, "validation_error")
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param}: ")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("hyperparameters", "gpus", "accepted"),
    [
        ({"batch_size": 1, "grad_accumulation": 4}, 1, False),  # each micro-batch of 1 pair is the filter group
        ({"batch_size": 1, "grad_accumulation": 4, "filter_scope": "step"}, 1, True),  # the step's 4 pairs
        ({"batch_size": 1, "grad_accumulation": 1, "filter_scope": "step"}, 1, False),
        ({"batch_size": 1}, 4, True),  # 4 GPUs: floor(0.8 x 4) = 3
    ],
)
def test_a_filter_group_too_small_to_filter_is_400_naming_both_fixes(
    client1: httpx.Client, dataset1: dict[str, Any], hyperparameters: dict[str, Any], gpus: int, accepted: bool
) -> None:
    """shared/DAMA.md 2.5: floor(keep_ratio x group) < 2 would silently turn filtering off."""
    spec = _spec(dataset1["id"], method="dama", gpus=gpus, hyperparameters={"max_steps": 4, **hyperparameters})
    response = client1.post("/jobs", json=spec)
    if accepted:
        assert response.status_code == 201, response.text
        client1.post(f"/jobs/{response.json()['id']}/cancel")
        return
    error = assert_error(response, 400, "filter_group_too_small")
    assert error["param"] == "hyperparameters.filter_scope"
    fixes = (
        ("filter_scope to 'step'", "batch_size")
        if spec["hyperparameters"].get("filter_scope") is None
        else (
            "batch_size",
            "grad_accumulation",
        )
    )
    assert all(fix in error["message"] for fix in fixes), error["message"]
    # The non-filtering methods take any group: dpo, and sft (shared/DAMA.md 4b), whose job records its method.
    for method in ("dpo", "sft"):
        created = client1.post("/jobs", json=_spec(dataset1["id"], method=method, hyperparameters=hyperparameters))
        assert created.status_code == 201, created.text
        assert created.json()["spec"]["method"] == method


def test_remote_code_is_refused_unless_the_operator_allows_it(client1: httpx.Client, dataset1: dict[str, Any]) -> None:
    """trust_remote_code would run a model repo's Python in the workers, beside every tenant's data."""
    response = client1.post("/jobs", json=_spec(dataset1["id"]) | {"trust_remote_code": True})
    error = assert_error(response, 422, "remote_code_not_allowed")
    assert error["param"] == "trust_remote_code"


def test_malformed_bodies(client1: httpx.Client) -> None:
    assert assert_error(client1.post("/jobs", json={}), 422)["param"] in {"model", "dataset_id"}
    error = assert_error(
        client1.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json"
    )
    assert "JSON" in error["message"]


def test_unknown_or_other_tenants_datasets_are_404_with_param(
    client1: httpx.Client, dataset1: dict[str, Any], dataset2: dict[str, Any]
) -> None:
    error = assert_error(client1.post("/jobs", json=_spec(dataset2["id"])), 404, "dataset_not_found")
    assert error["param"] == "dataset_id"
    error = assert_error(client1.post("/jobs", json=_spec("ds_nope")), 404, "dataset_not_found")
    assert error["param"] == "dataset_id"
    spec = _spec(dataset1["id"], evaluation={"dataset_id": dataset2["id"]})
    error = assert_error(client1.post("/jobs", json=spec), 404, "dataset_not_found")
    assert error["param"] == "evaluation.dataset_id"
    with_eval = client1.post("/jobs", json=_spec(dataset1["id"], evaluation={"dataset_id": dataset1["id"]}))
    assert with_eval.status_code == 201, with_eval.text


def test_other_tenants_job_is_404(client1: httpx.Client, client2: httpx.Client, dataset1: dict[str, Any]) -> None:
    job = client1.post("/jobs", json=_spec(dataset1["id"])).json()
    for method, path in (
        ("GET", f"/jobs/{job['id']}"),
        ("POST", f"/jobs/{job['id']}/cancel"),
        ("GET", f"/jobs/{job['id']}/events"),
        ("GET", f"/jobs/{job['id']}/metrics"),
        ("GET", f"/jobs/{job['id']}/checkpoints"),
        ("GET", f"/jobs/{job['id']}/adapter"),
    ):
        assert_error(client2.request(method, path), 404, "job_not_found")
    assert job["id"] not in [item["id"] for item in client2.get("/jobs").json()["data"]]
    assert client1.get(f"/jobs/{job['id']}").json()["status"] == "queued"  # tenant 2's cancel did nothing


def test_idempotent_create(
    client1: httpx.Client, dataset1: dict[str, Any], api_server: ApiServer, redis_url: str
) -> None:
    queue = redis.Redis.from_url(redis_url)
    headers = {"Idempotency-Key": "create-job-once"}
    first = client1.post("/jobs", json=_spec(dataset1["id"]), headers=headers)
    assert first.status_code == 201, first.text
    length = queue.llen(api_server.queue)
    # The same body, written differently (a default spelled out), is the same request.
    again = client1.post("/jobs", json=_spec(dataset1["id"], method="dama"), headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert queue.llen(api_server.queue) == length  # not sent twice
    different = client1.post("/jobs", json=_spec(dataset1["id"], method="dpo"), headers=headers)
    assert_error(different, 409, "idempotency_key_reused")


def test_cancel(client1: httpx.Client, dataset1: dict[str, Any], db: sessionmaker[Session]) -> None:
    job = client1.post("/jobs", json=_spec(dataset1["id"])).json()
    cancelled = client1.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"] is not None
    assert_error(client1.post(f"/jobs/{job['id']}/cancel"), 409, "job_not_cancellable")

    # A running job goes through 'cancelling' (the worker stops it).
    running = client1.post("/jobs", json=_spec(dataset1["id"])).json()
    with db() as session:
        assert repository.claim_job(session, job_id=running["id"], worker="test-worker") is not None
        session.commit()
    assert client1.post(f"/jobs/{running['id']}/cancel").json()["status"] == "cancelling"
    assert client1.post(f"/jobs/{running['id']}/cancel").json()["status"] == "cancelling"  # no-op


def test_list_filters_and_paginates(client1: httpx.Client, dataset1: dict[str, Any]) -> None:
    created = [client1.post("/jobs", json=_spec(dataset1["id"])).json()["id"] for _ in range(3)]
    client1.post(f"/jobs/{created[0]}/cancel")
    page = client1.get("/jobs", params={"limit": 2}).json()
    assert [item["id"] for item in page["data"]] == [created[2], created[1]]
    assert page["has_more"] is True and page["next_cursor"] == created[1]
    following = client1.get("/jobs", params={"limit": 2, "after": page["next_cursor"]}).json()
    assert following["data"][0]["id"] == created[0]
    cancelled = client1.get("/jobs", params={"status": "cancelled", "limit": 100}).json()["data"]
    assert created[0] in [item["id"] for item in cancelled]
    assert all(item["status"] == "cancelled" for item in cancelled)
    assert assert_error(client1.get("/jobs", params={"status": "done"}), 422)["param"] == "status"


def test_job_stays_queued_when_the_broker_is_down(
    limited_server: ApiServer, key1: str, dataset1: dict[str, Any]
) -> None:
    with limited_server.client(key1) as client:
        # dpo: this server has no hardness scorer, and dataset1's rows carry no hardness (tests/api/test_job_checks.py)
        response = client.post("/jobs", json=_spec(dataset1["id"], method="dpo"))
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["status"] == "queued" and job["queue"] == limited_server.queue
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
