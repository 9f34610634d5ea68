"""A new user's first hour, on the whole service (the compose commands' API and worker, real Postgres, Redis and
Celery, HTTP only): their own small TRL archive without hardness trains with ``dama`` on a service whose operator
named a CLIP scorer (here a tiny CLIP folder built on this machine) and with ``dpo``; a scorer or a model that
cannot be loaded fails in ``validating`` within seconds, as a one-line ``user_error``; a cancel while the model
loads, while CLIP scores the pairs or while training ends ``cancelled`` within 15 s; the downloaded adapter
names its base ``dama/tiny-llava`` and loads with peft on the base ``dama models build`` makes on this machine.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from dama_engine.models.tiny import build_tiny_clip
from tests.api.test_job_checks import own_archive
from tests.e2e.test_service_e2e import ENDED, VENV_BIN, _download_adapter, run_service
from worker.engine_config import build_builtin_model

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
        tmp_path_factory.mktemp("first-hour"),
        pg_url,
        redis_url,
        DAMA_HARDNESS_SCORER=str(tiny_clip),
        DAMA_ALLOW_REMOTE_CODE="true",  # for the slow-loading model below, whose class is the folder's own code
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


def test_own_archive_without_hardness_trains_with_dpo_and_its_adapter_loads_on_a_locally_built_base(
    client: httpx.Client, unscored: str, first_hour: dict[str, Any], tmp_path: Path
) -> None:
    job_id = _job(client, unscored, method="dpo")
    job = _ended(client, job_id)
    assert job["status"] == "succeeded", job

    adapter_dir = _download_adapter(client, f"/jobs/{job_id}/adapter", tmp_path / "adapter")
    # The adapter names its base as the user knows it, never the workers' folder.
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "dama/tiny-llava"
    card = (adapter_dir / "README.md").read_text()
    assert "base_model: dama/tiny-llava" in card and str(first_hour["root"]) not in card
    training_config = (adapter_dir / "training_config.json").read_text()
    assert json.loads(training_config)["model"]["name_or_path"] == "dama/tiny-llava"
    assert str(first_hour["root"]) not in training_config and '"/' not in training_config

    # The README's way to a base it loads on: `dama models build`, then peft.
    base_dir = tmp_path / "tiny-llava"
    built = subprocess.run(
        [str(VENV_BIN / "dama"), "models", "build", "dama/tiny-llava", "--output", str(base_dir)],
        env=first_hour["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter_dir).eval()
        # The same weights as the base the worker trained on: base + adapter gives the worker's own logits.
        workers_base = next(p.parent for p in first_hour["models"].rglob("config.json") if "llava" in p.read_text())
        reference = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(workers_base), adapter_dir)
        torch.testing.assert_close(tuned(input_ids=tokens).logits, reference.eval()(input_ids=tokens).logits)


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


SLOW_MODEL_CODE = """
import time

from transformers import LlavaForConditionalGeneration


class SlowLlava(LlavaForConditionalGeneration):
    # Loading takes five minutes, in short steps, as reading many weight shards does.
    def __init__(self, config, *args, **kwargs):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.05)
        super().__init__(config, *args, **kwargs)
"""


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA, but its weights take five minutes to load: a model folder with its own code (auto_map)."""
    folder = tmp_path_factory.mktemp("slow") / "slow-llava"
    build_builtin_model("dama/tiny-llava", folder)
    (folder / "slow_llava.py").write_text(SLOW_MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "slow_llava.SlowLlava"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _cancel_within(client: httpx.Client, job_id: str, seconds: float) -> dict[str, Any]:
    asked = time.monotonic()
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    job = _ended(client, job_id, timeout=120)
    took = time.monotonic() - asked
    assert job["status"] == "cancelled", job
    assert took < seconds, f"cancelled after {took:.1f} s"
    return job


def _wait_for(client: httpx.Client, job_id: str, done: Any, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not done(job := client.get(f"/jobs/{job_id}").json()):
        assert job["status"] not in ENDED and time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def test_a_cancel_while_the_model_loads_ends_cancelled_within_15_s(
    client: httpx.Client, unscored: str, slow_model: Path
) -> None:
    job_id = _job(client, unscored, model=str(slow_model), method="dpo", trust_remote_code=True)
    _wait_for(client, job_id, lambda job: job["stage"] == "loading_model")
    time.sleep(1.0)  # well inside the five-minute load
    _cancel_within(client, job_id, 15)


@pytest.fixture(scope="module")
def slow_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP scorer whose image tower is large enough (224 px in 8 px patches, 12 layers of width 256: about
    20 GFLOP an image) that scoring 40 pairs takes tens of seconds on a CPU thread, as a real scorer on many
    pairs does."""
    folder = tmp_path_factory.mktemp("slow-clip")
    vision = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 4}
    model, processor = build_tiny_clip(image_size=224, patch_size=8, vision=vision)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_cancel_while_scoring_ends_cancelled_within_15_s(client: httpx.Client, slow_clip: Path) -> None:
    response = client.post("/datasets", files={"file": ("forty.zip", own_archive(40, with_hardness=False))})
    assert response.status_code == 201, response.text
    job_id = _job(client, response.json()["id"], method="dama", hardness_scorer=str(slow_clip))
    _wait_for(client, job_id, lambda job: job["stage"] == "scoring")
    time.sleep(1.0)  # inside the scoring of 40 pairs
    _cancel_within(client, job_id, 15)
    assert _stages(client, job_id)[-1] == "scoring"  # stopped there, not at the next stage's boundary


def test_a_cancel_while_training_ends_cancelled_within_15_s(client: httpx.Client, unscored: str) -> None:
    job_id = _job(client, unscored, method="dpo", hyperparameters={**QUICK, "max_steps": 5000})
    _wait_for(client, job_id, lambda job: job["stage"] == "training" and job["step"] >= 2)
    job = _cancel_within(client, job_id, 15)
    assert job["step"] < 5000
