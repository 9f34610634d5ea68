"""Job estimates end to end: ``POST /jobs/estimate`` (and ``dama jobs create --estimate``) on a real API server,
answered by a real Celery worker (``worker_queue``) that runs the engine's estimate over the built-in tiny LLaVA
and the demo dataset; the 202 path and polling; tenant scoping; the same 4xx as ``POST /jobs``; and the fit check
of ``POST /jobs`` on two more API servers of the same database, one whose operator says its GPUs have far too
little memory (refused with what to change) and one with plenty (accepted)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.services.estimates import unfit_message
from dama_client import Client
from jobstore import estimates, repository
from jobstore.db import session_scope
from jobstore.models import JobEstimate, utcnow
from tests.api.conftest import ROOT, ApiServer, _server_env, _start, assert_error, create_key, upload
from tests.worker.conftest import wait_for

TINY_GPU_GIB = "0.001"  # far below what even the tiny model's weights take
ROOMY_GPU_GIB = "1000"


def _spec(dataset_id: str, queue: str, **overrides: Any) -> dict[str, Any]:
    spec = {"model": "dama/tiny-llava", "dataset_id": dataset_id, "method": "dpo", "queue": queue}
    return {**spec, "hyperparameters": {"max_steps": 2, "batch_size": 2}, **overrides}


def _job_ids(client: httpx.Client) -> list[str]:
    return [job["id"] for job in client.get("/jobs", params={"limit": 100}).json()["data"]]


def _gpu_server(api_server: ApiServer, tmp: Any, memory_gib: str, **settings: str) -> Iterator[ApiServer]:
    """Another API process on api_server's database, broker and artifact store (so the worker of ``worker_queue``
    answers its estimates), whose operator says one worker GPU has ``memory_gib`` GiB (and ``settings``). Its own
    queue has no worker."""
    queue = f"test-api-{secrets.token_hex(4)}"
    broker = api_server.env["DAMA_BROKER_URL"]
    env = _server_env(
        api_server.env["DAMA_DATABASE_URL"],
        broker,
        api_server.artifacts,
        queue,
        **{
            "DAMA_WORKER_GPU_MEMORY_GB": memory_gib,
            "DAMA_WORKER_GPU_KIND": "H100",
            "DAMA_ESTIMATE_WAIT_S": api_server.env["DAMA_ESTIMATE_WAIT_S"],
            **settings,
        },
    )
    yield from _start(tmp, env, queue)
    redis.Redis.from_url(broker).delete(queue)


@pytest.fixture(scope="module")
def tight_server(api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from _gpu_server(api_server, tmp_path_factory.mktemp("api-tight"), TINY_GPU_GIB)


@pytest.fixture(scope="module")
def roomy_server(api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from _gpu_server(api_server, tmp_path_factory.mktemp("api-roomy"), ROOMY_GPU_GIB)


def test_an_estimate_is_answered_with_the_jobs_figures_and_queues_nothing(
    api_server: ApiServer,
    key1: str,
    client1: httpx.Client,
    client2: httpx.Client,
    dataset1: dict[str, Any],
    worker_queue: str,
) -> None:
    jobs_before = _job_ids(client1)
    with Client(api_server.url, key1) as sdk:
        estimate = sdk.jobs.estimate(**_spec(dataset1["id"], worker_queue))
        assert estimate.status == "succeeded", estimate.error
        assert estimate.id.startswith("est_") and estimate.queue == worker_queue
        assert sdk.jobs.get_estimate(estimate.id).estimate == estimate.estimate  # polling reads the same
        assert sdk.jobs.wait_estimate(estimate.id).status == "succeeded"
    assert _job_ids(client1) == jobs_before  # nothing was queued
    figures = estimate.estimate
    assert figures is not None
    assert 0 < figures["rows"] <= 6 and figures["rows_measured"] == figures["rows"]
    assert figures["steps"] == 2  # max_steps
    tokens, memory = figures["tokens"], figures["memory"]
    assert 0 < tokens["per_pair_mean"] <= tokens["per_pair_max"] and tokens["total"] > 0
    assert memory["peak_gib"] > 0 and memory["batch_size"] == 2 and memory["world_size"] == 1
    assert memory["strategy"] == "ddp" and memory["gradient_checkpointing"] is False
    parts = memory["parts_gib"]
    assert set(parts) == {"weights", "optimizer_state", "gathered", "activations", "gradients"}
    # the engine's rule (dama_engine/training/estimate.py), each figure rounded to 3 significant digits
    made = (
        parts["weights"] + parts["optimizer_state"] + parts["gathered"] + max(parts["activations"], parts["gradients"])
    )
    assert memory["peak_gib"] == pytest.approx(made, rel=0.02)
    assert figures["parameters"]["total"] > figures["parameters"]["trainable"] > 0
    assert figures["options"] and all(option["fits"] is None for option in figures["options"])
    # api_server's operator gives no GPU memory or kind: no fit is claimed, no time, no advice
    assert (figures["fits"], figures["gpu_memory_gib"], figures["time"], figures["advice"]) == (None, None, None, [])
    # another tenant cannot see it
    assert_error(client2.get(f"/jobs/estimates/{estimate.id}"), 404, "estimate_not_found")


def test_an_estimate_no_worker_takes_is_202_then_polled_until_it_is_given_up(
    client1: httpx.Client, dataset1: dict[str, Any], api_server: ApiServer, db: sessionmaker[Session]
) -> None:
    # api_server's own queue: no worker consumes it
    response = client1.post("/jobs/estimate", params={"wait": 0}, json=_spec(dataset1["id"], api_server.queue))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["estimate"] is None and body["error"] is None
    assert response.headers["location"] == f"/jobs/estimates/{body['id']}"
    polled = client1.get(response.headers["location"])
    assert polled.status_code == 200 and polled.json()["status"] == "queued"
    # DAMA_ESTIMATE_TIMEOUT_S (600 s) later it ends, saying nobody answered: moved back in time here
    with session_scope(db) as session:
        session.execute(
            update(JobEstimate).where(JobEstimate.id == body["id"]).values(created_at=utcnow() - timedelta(seconds=601))
        )
    given_up = client1.get(f"/jobs/estimates/{body['id']}").json()
    assert given_up["status"] == "failed" and given_up["finished_at"] is not None
    assert given_up["error"]["kind"] == "system_error"
    assert f"no worker of queue '{api_server.queue}' took this estimate within 600 s" in given_up["error"]["message"]


def test_an_estimate_that_cannot_be_sent_fails_at_once(
    limited_server: ApiServer, key1: str, dataset1: dict[str, Any]
) -> None:
    # limited_server's broker is down: nothing would ever send the estimate, so no poller is left waiting
    with limited_server.client(key1) as client:
        response = client.post("/jobs/estimate", json=_spec(dataset1["id"], "nowhere"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed" and body["error"]["kind"] == "system_error" and body["estimate"] is None
    assert "could not be sent to the workers of queue 'nowhere'" in body["error"]["message"]


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"dataset_id": "ds_missing"}, 404, "dataset_not_found"),
        ({"model": "dama/tiny-lava"}, 400, "unknown_model"),
        ({"hyperparameters": {"learning_rate": -1}}, 422, "validation_error"),
        ({"init_adapter": "job_missing"}, 404, "job_not_found"),
        ({"trust_remote_code": True}, 422, "remote_code_not_allowed"),
        ({"method": "dama", "hyperparameters": {"batch_size": 1, "keep_ratio": 0.5}}, 400, "filter_group_too_small"),
    ],
)
def test_a_bad_spec_is_refused_as_post_jobs_refuses_it(
    client1: httpx.Client, dataset1: dict[str, Any], change: dict[str, Any], status: int, code: str
) -> None:
    spec = {**_spec(dataset1["id"], "nowhere"), **change}
    refused = assert_error(client1.post("/jobs", json=spec), status, code)
    assert assert_error(client1.post("/jobs/estimate", json=spec), status, code) == refused


def test_another_tenants_dataset_is_404(client1: httpx.Client, dataset2: dict[str, Any]) -> None:
    error = assert_error(client1.post("/jobs/estimate", json=_spec(dataset2["id"], "nowhere")), 404)
    assert error["param"] == "dataset_id"


def test_an_estimate_the_worker_cannot_make_is_a_400_with_its_reason(
    api_server: ApiServer, client1: httpx.Client, demo_archive: bytes, worker_queue: str
) -> None:
    created = upload(client1, demo_archive, "gone.zip")
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    shutil.rmtree(api_server.artifacts / "datasets" / dataset_id / "data")  # its files lost on the store
    error = assert_error(client1.post("/jobs/estimate", json=_spec(dataset_id, worker_queue)), 400, "estimate_failed")
    assert f"training dataset {dataset_id} has no files" in error["message"]
    assert str(api_server.artifacts) not in error["message"]  # no server path shown


def test_the_cli_prints_the_estimate_or_its_json(
    api_server: ApiServer, key1: str, client1: httpx.Client, dataset1: dict[str, Any], worker_queue: str
) -> None:
    env = {**api_server.env, "DAMA_API_URL": api_server.url, "DAMA_API_KEY": key1}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "api.cli", "jobs", "create", "--model", "dama/tiny-llava"]
    command += ["--dataset", dataset1["id"], "--method", "dpo", "--set", "max_steps=3"]
    command += ["--spec", json.dumps({"queue": worker_queue})]
    jobs_before = _job_ids(client1)

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*command, "--estimate", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    text = run().stdout
    assert "nothing was queued" in text and "steps: 3 (" in text and "peak memory: " in text
    assert "parts: weights " in text and "max(activations, gradients)" in text  # the parts do not add up
    assert "fits: unknown" in text and "options (peak memory per GPU under other settings):" in text
    assert "gradient_checkpointing" in text.split("options", 1)[1]  # the table's header
    printed = json.loads(run("--json").stdout)
    assert printed["status"] == "succeeded" and printed["estimate"]["steps"] == 3
    assert _job_ids(client1) == jobs_before


def test_post_jobs_refuses_a_job_that_does_not_fit_saying_what_to_change(
    tight_server: ApiServer, key1: str, dataset1: dict[str, Any], worker_queue: str, db: sessionmaker[Session]
) -> None:
    with tight_server.client(key1) as client:
        jobs_before = _job_ids(client)
        error = assert_error(client.post("/jobs", json=_spec(dataset1["id"], worker_queue)), 400, "does_not_fit")
        assert _job_ids(client) == jobs_before  # refused: no job
        message = error["message"]
        assert f"more than the {TINY_GPU_GIB} GiB of one worker GPU (DAMA_WORKER_GPU_MEMORY_GB)" in message
        assert "What to change: " in message and "The whole estimate: est_" in message
        estimate_id = message.rsplit("The whole estimate: ", 1)[1]
        estimate = client.get(f"/jobs/estimates/{estimate_id}").json()
    figures = estimate["estimate"]
    assert figures["fits"] is False and figures["gpu_memory_gib"] == float(TINY_GPU_GIB)
    assert figures["advice"] and all(advice in message for advice in figures["advice"])
    assert f"this job needs about {figures['memory']['peak_gib']:.3g} GiB per GPU (ddp on 1 GPU(s)" in message
    assert "parts: weights " in message and "max(activations, gradients)" in message
    assert figures["time"]["gpu_kind"] == "H100" and figures["time"]["seconds"] >= 0  # the tiny model: ~0 s
    # the same body, estimated, says the same without refusing
    with tight_server.client(key1) as client:
        same = client.post("/jobs/estimate", json=_spec(dataset1["id"], worker_queue))
    assert same.status_code == 200 and same.json()["estimate"]["fits"] is False
    with session_scope(db) as session:
        stored = session.scalar(select(JobEstimate).where(JobEstimate.id == estimate_id))
        assert stored is not None and stored.gpu_memory_gib == float(TINY_GPU_GIB) and stored.gpu_kind == "H100"


def test_post_jobs_accepts_a_job_that_fits(
    roomy_server: ApiServer, key1: str, dataset1: dict[str, Any], worker_queue: str, db: sessionmaker[Session]
) -> None:
    before = _estimate_ids(db, "t1")
    with roomy_server.client(key1) as client:
        created = client.post("/jobs", json=_spec(dataset1["id"], worker_queue))
        assert created.status_code == 201, created.text
        assert client.post(f"/jobs/{created.json()['id']}/cancel").status_code == 200
    new = [estimate for estimate in _estimates(db, "t1") if estimate.id not in before]
    assert len(new) == 1  # its estimate, stored: it fits
    assert new[0].status == "succeeded" and new[0].result is not None and new[0].gpu_memory_gib == 1000.0
    assert new[0].result["fits"] is True and new[0].result["advice"] == []


def _estimates(db: sessionmaker[Session], tenant: str) -> list[JobEstimate]:
    with session_scope(db) as session:
        tenant_id = repository.get_or_create_tenant(session, name=tenant).id
        rows = session.scalars(select(JobEstimate).where(JobEstimate.tenant_id == tenant_id)).all()
        session.expunge_all()
        return list(rows)


def _estimate_ids(db: sessionmaker[Session], tenant: str) -> set[str]:
    return {estimate.id for estimate in _estimates(db, tenant)}


def test_post_jobs_accepts_a_job_whose_estimate_failed(
    tight_server: ApiServer,
    key1: str,
    client1: httpx.Client,
    demo_archive: bytes,
    worker_queue: str,
    db: sessionmaker[Session],
) -> None:
    # Its files lost on the store: the worker cannot estimate it (a user_error); the job's own validating stage
    # reports that, so the fit check lets it through.
    created = upload(client1, demo_archive, "lost.zip")
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    shutil.rmtree(tight_server.artifacts / "datasets" / dataset_id / "data")
    before = _estimate_ids(db, "t1")
    with tight_server.client(key1) as client:
        job = client.post("/jobs", json=_spec(dataset_id, worker_queue))
        assert job.status_code == 201, job.text
        assert client.post(f"/jobs/{job.json()['id']}/cancel").status_code == 200
    (estimate,) = [estimate for estimate in _estimates(db, "t1") if estimate.id not in before]
    assert (estimate.status, estimate.error_kind) == ("failed", "user_error")  # it failed, not timed out


@pytest.fixture(scope="module")
def impatient_server(api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """Tiny GPUs, no wait for a worker's estimate, and at most 2 pending estimates per tenant."""
    tmp = tmp_path_factory.mktemp("api-impatient")
    settings = {"DAMA_ESTIMATE_WAIT_S": "0", "DAMA_MAX_PENDING_ESTIMATES": "2"}
    yield from _gpu_server(api_server, tmp, TINY_GPU_GIB, **settings)


def test_post_jobs_accepts_a_job_no_worker_estimated_in_time_and_pending_estimates_are_limited(
    impatient_server: ApiServer, db: sessionmaker[Session], demo_archive: bytes
) -> None:
    key = create_key(db, "t-estimates")
    with impatient_server.client(key) as client:
        created = upload(client, demo_archive, "demo.zip")
        assert created.status_code == 201, created.text
        spec = _spec(created.json()["id"], impatient_server.queue)  # no worker consumes it
        # the fit check's estimate is not answered at once (DAMA_ESTIMATE_WAIT_S 0): the job is accepted
        job = client.post("/jobs", json=spec)
        assert job.status_code == 201, job.text
        assert client.post(f"/jobs/{job.json()['id']}/cancel").status_code == 200
        assert [estimate.status for estimate in _estimates(db, "t-estimates")] == ["queued"]
        # one more pending estimate is allowed (DAMA_MAX_PENDING_ESTIMATES 2), a third is not
        assert client.post("/jobs/estimate", json=spec).status_code == 202
        refused = client.post("/jobs/estimate", json=spec)
        error = assert_error(refused, 429, "too_many_pending_estimates")
        assert (
            "2 job estimates queued or running" in error["message"] and "DAMA_MAX_PENDING_ESTIMATES" in error["message"]
        )
        assert refused.headers["retry-after"] == "10"
        # POST /jobs at the limit: accepted without a fit check, and no estimate made
        job = client.post("/jobs", json=spec)
        assert job.status_code == 201, job.text
        assert client.post(f"/jobs/{job.json()['id']}/cancel").status_code == 200
        assert len(_estimates(db, "t-estimates")) == 2
        # estimates given up on (DAMA_ESTIMATE_TIMEOUT_S after they were asked for) no longer count
        with session_scope(db) as session:
            session.execute(
                update(JobEstimate)
                .where(JobEstimate.id.in_(_estimate_ids(db, "t-estimates")))
                .values(created_at=utcnow() - timedelta(seconds=601))
            )
        assert client.post("/jobs/estimate", json=spec).status_code == 202


def test_post_jobs_holds_no_lock_on_its_datasets_while_the_estimate_is_waited_for(
    tight_server: ApiServer, key1: str, client1: httpx.Client, demo_archive: bytes, db: sessionmaker[Session]
) -> None:
    created = upload(client1, demo_archive, "short-lived.zip")
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    before = _estimate_ids(db, "t1")
    with ThreadPoolExecutor(1) as pool, tight_server.client(key1) as client:
        # no worker consumes api_server's queue: the fit check waits (DAMA_ESTIMATE_WAIT_S 60) for its estimate
        posted = pool.submit(client.post, "/jobs", json=_spec(dataset_id, tight_server.queue))
        waiting = wait_for(
            lambda: [i for i in _estimate_ids(db, "t1") if i not in before], timeout=60, what="its estimate"
        )
        started = time.monotonic()
        assert client1.delete(f"/datasets/{dataset_id}").status_code == 204  # not blocked by the waiting request
        assert time.monotonic() - started < 10
        with session_scope(db) as session:  # a worker answers: it fits
            assert estimates.claim_estimate(session, estimate_id=waiting[0], timeout_s=600) is not None
            assert estimates.finish_estimate(session, estimate_id=waiting[0], result={"fits": True})
        # the job's own checks run again after the estimate, under their locks: the dataset is gone
        error = assert_error(posted.result(timeout=120), 404, "dataset_not_found")
    assert error["param"] == "dataset_id"


def test_unfit_message_gives_the_peak_then_its_parts_with_the_rule_and_what_to_change() -> None:
    figures = {
        "memory": {
            "peak_gib": 43.9,
            "parts_gib": {
                "weights": 13.1,
                "optimizer_state": 0.6,
                "gathered": 0.0,
                "activations": 30.2,
                "gradients": 0.6,
            },
            "strategy": "ddp",
            "world_size": 1,
            "batch_size": 8,
            "gradient_checkpointing": False,
            "compiled": True,
        },
        "gpu_memory_gib": 40.0,
        "fits": False,
        "advice": ["turn hyperparameters.gradient_checkpointing on, about 30% slower (21 GiB per GPU)"],
    }
    assert unfit_message("est_1", figures) == (
        "this job needs about 43.9 GiB per GPU (ddp on 1 GPU(s), batch_size 8, gradient checkpointing off, compiled "
        "on), more than the 40 GiB of one worker GPU (DAMA_WORKER_GPU_MEMORY_GB); parts: weights 13.1 GiB, "
        "optimizer_state 0.6 GiB, gathered 0 GiB, activations 30.2 GiB, gradients 0.6 GiB (peak = weights + "
        "optimizer_state + gathered + max(activations, gradients); the CUDA context and the allocator's cache come "
        "on top). What to change: turn hyperparameters.gradient_checkpointing on, about 30% slower (21 GiB per GPU). "
        "The whole estimate: est_1"
    )
    # without advice from the engine, the usual levers are named
    assert "What to change: use a smaller batch_size, gradient_checkpointing, fsdp or more GPUs." in unfit_message(
        "est_1", {**figures, "advice": []}
    )
