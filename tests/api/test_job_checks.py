"""What ``POST /jobs`` refuses before a job is queued, so a new user's first job is not a failure minutes later:
a ``dama/...`` model that is not built in (400 ``unknown_model``), and a hardness-weighted method on rows without
hardness when the service has no CLIP scorer (400 ``hardness_required``, naming the fixes). ``GET /models`` says
which scorer the service has.

``api_server`` names a scorer (``DAMA_HARDNESS_SCORER``); ``limited_server``, on the same database (the same keys
and datasets), names none.
"""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from jobstore.spec import BUILTIN_MODELS
from tests.api.conftest import API_SERVER_SCORER, ApiServer, assert_error, upload, zip_bytes


def own_archive(rows: int, *, with_hardness: bool) -> bytes:
    """A user's own TRL archive, laid out as the README's Quick start says: the data file at the top, image paths
    relative to it."""
    members: dict[str, bytes] = {}
    lines = []
    for index in range(rows):
        image = io.BytesIO()
        Image.new("RGB", (8, 8), (index * 20 % 256, 0, 0)).save(image, format="PNG")
        members[f"images/{index}.png"] = image.getvalue()
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
            "chosen": "a red square",
            "rejected": "a blue circle",
            "images": [f"images/{index}.png"],
        }
        if with_hardness:
            row["hardness"] = 0.1 * (index % 5)
        lines.append(json.dumps(row))
    members["pairs.jsonl"] = "\n".join(lines).encode()
    return zip_bytes(members)


def _upload(client: httpx.Client, *, with_hardness: bool) -> str:
    response = upload(client, own_archive(12, with_hardness=with_hardness), "pairs.zip")
    assert response.status_code == 201, response.text
    dataset_id: str = response.json()["id"]
    return dataset_id


@pytest.fixture(scope="module")
def unscored(client1: httpx.Client) -> str:
    return _upload(client1, with_hardness=False)


@pytest.fixture(scope="module")
def scored(client1: httpx.Client) -> str:
    return _upload(client1, with_hardness=True)


@pytest.fixture(scope="module")
def no_scorer(limited_server: ApiServer, key1: str) -> httpx.Client:
    """Tenant t1 on the service without a hardness scorer."""
    return limited_server.client(key1)


def _spec(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    return {"model": "dama/tiny-llava", "dataset_id": dataset_id, "hyperparameters": {"max_steps": 2}} | overrides


def test_models_names_the_services_hardness_scorer(client1: httpx.Client, no_scorer: httpx.Client) -> None:
    assert client1.get("/models").json()["hardness_scorer"] == API_SERVER_SCORER
    assert no_scorer.get("/models").json()["hardness_scorer"] is None


@pytest.mark.parametrize("method", ["dama", "dama_data"])
def test_hardness_methods_on_rows_without_hardness_are_refused_with_the_fixes(
    no_scorer: httpx.Client, unscored: str, method: str
) -> None:
    error = assert_error(no_scorer.post("/jobs", json=_spec(unscored, method=method)), 400, "hardness_required")
    assert error["param"] == "method"
    message = error["message"]
    for fix in ("'hardness'", "'chosen_score' and 'rejected_score'", "'dpo'", "'dama_model'", "DAMA_HARDNESS_SCORER"):
        assert fix in message, message
    assert unscored in message and "\n" not in message


@pytest.mark.parametrize("method", ["dpo", "dama_model", "beta_dpo"])
def test_methods_without_hardness_are_accepted_on_rows_without_it(
    no_scorer: httpx.Client, unscored: str, method: str
) -> None:
    response = no_scorer.post("/jobs", json=_spec(unscored, method=method))
    assert response.status_code == 201, response.text


def test_rows_with_hardness_need_no_scorer(no_scorer: httpx.Client, scored: str) -> None:
    response = no_scorer.post("/jobs", json=_spec(scored, method="dama"))
    assert response.status_code == 201, response.text


def test_with_a_scorer_the_job_records_the_services_scorer(client1: httpx.Client, unscored: str) -> None:
    response = client1.post("/jobs", json=_spec(unscored, method="dama"))
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["hardness_scorer"] == API_SERVER_SCORER
    own = client1.post("/jobs", json=_spec(unscored, method="dama", hardness_scorer="/models/our-clip"))
    assert own.status_code == 201, own.text
    assert own.json()["spec"]["hardness_scorer"] == "/models/our-clip"  # a scorer the job names is kept


def test_a_misspelled_built_in_model_is_400_with_the_list(client1: httpx.Client, unscored: str) -> None:
    error = assert_error(client1.post("/jobs", json=_spec(unscored, model="dama/tiny-lava")), 400, "unknown_model")
    assert error["param"] == "model"
    assert "did you mean 'dama/tiny-llava'?" in error["message"]
    assert all(name in error["message"] for name in BUILTIN_MODELS), error["message"]
    assert_error(client1.post("/jobs", json=_spec(unscored, model="dama/llava-13b")), 400, "unknown_model")
    # Other names are the workers' to load: accepted here, checked in the job's validating stage.
    assert client1.post("/jobs", json=_spec(unscored, model="org/some-vlm")).status_code == 201
