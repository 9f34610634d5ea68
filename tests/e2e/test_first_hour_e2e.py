"""A new user's first hour, on the whole service (the compose commands' API and worker, real Postgres, Redis and
Celery, HTTP only): their own small TRL archive without hardness trains with ``dama`` on a service whose operator
named a CLIP scorer (here a tiny CLIP folder built on this machine) and with ``dpo``; a scorer or a model that
cannot be loaded fails in ``validating`` within seconds, as a one-line ``user_error``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dama_engine.models.tiny import build_tiny_clip
from tests.api.test_job_checks import own_archive
from tests.e2e.test_service_e2e import ENDED, run_service

ROWS = 12
QUICK = {"batch_size": 4, "max_steps": 3, "checkpoint_every": 100, "max_length": 256}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    model, processor = build_tiny_clip()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def first_hour(
    pg_url: str, redis_url: str, tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The service, its operator having named a CLIP scorer the workers can load."""
    yield from run_service(
        tmp_path_factory.mktemp("first-hour"), pg_url, redis_url, DAMA_HARDNESS_SCORER=str(tiny_clip)
    )


@pytest.fixture(scope="module")
def client(first_hour: dict[str, Any]) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {first_hour['key']}"}
    with httpx.Client(base_url=first_hour["url"], headers=headers, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def unscored(client: httpx.Client) -> str:
    response = client.post("/datasets", files={"file": ("pairs.zip", own_archive(ROWS, with_hardness=False))})
    assert response.status_code == 201, response.text
    dataset_id: str = response.json()["id"]
    return dataset_id


def _job(client: httpx.Client, dataset_id: str, **spec: Any) -> str:
    body = {"model": "dama/tiny-llava", "dataset_id": dataset_id, "hyperparameters": QUICK} | spec
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def _ended(client: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in ENDED:
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    return job


def _stages(client: httpx.Client, job_id: str) -> list[str]:
    events = client.get(f"/jobs/{job_id}/events", params={"limit": 200}).json()["data"]
    return [event["data"]["stage"] for event in events if event["type"] == "stage"]


def test_own_archive_without_hardness_trains_with_dama_on_the_services_scorer(
    client: httpx.Client, unscored: str, tiny_clip: Path
) -> None:
    assert client.get("/models").json()["hardness_scorer"] == str(tiny_clip)
    job_id = _job(client, unscored, method="dama")
    assert client.get(f"/jobs/{job_id}").json()["spec"]["hardness_scorer"] == str(tiny_clip)
    job = _ended(client, job_id)
    assert job["status"] == "succeeded", job
    assert "scoring" in _stages(client, job_id)


def test_own_archive_without_hardness_trains_with_dpo(client: httpx.Client, unscored: str) -> None:
    job = _ended(client, _job(client, unscored, method="dpo"))
    assert job["status"] == "succeeded", job


def _one_line_user_error(job: dict[str, Any]) -> str:
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["kind"] == "user_error", error
    message: str = error["message"]
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_a_scorer_that_cannot_load_is_a_one_line_user_error_in_validating(client: httpx.Client, unscored: str) -> None:
    started = time.monotonic()
    job_id = _job(client, unscored, method="dama", hardness_scorer="/nonexistent/clip-folder")
    message = _one_line_user_error(_ended(client, job_id, timeout=60))
    assert message.startswith("CLIP hardness scorer '/nonexistent/clip-folder' could not be loaded: there is no folder")
    assert "'hardness'" in message and "dpo" in message
    assert _stages(client, job_id) == ["validating"]
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("model", ["org/no-such-vlm", "/nonexistent/models/our-vlm"])
def test_a_model_that_cannot_load_fails_in_validating_within_seconds(
    client: httpx.Client, unscored: str, model: str
) -> None:
    started = time.monotonic()
    job_id = _job(client, unscored, model=model, method="dpo")
    message = _one_line_user_error(_ended(client, job_id, timeout=60))
    assert message.startswith(f"model {model!r} could not be loaded: "), message
    assert _stages(client, job_id) == ["validating"]
    assert time.monotonic() - started < 30
