"""Starting from an adapter through the API (shared/DAMA.md section 4b), on the whole service (uvicorn, a Celery
worker, Postgres, Redis): an sft job, then a dama job with ``init_adapter`` naming it. The dama job's reference is
base + the sft adapter, its after-training evaluation compares against that and reports the plain base too, and its
adapter loads on the plain base."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.test_client_e2e import _load_adapter
from tests.e2e.test_service_e2e import ENDED, _dataset_zip, _download_adapter, _wait, service

__all__ = ["service"]  # the same fixture, one service for this module

HYPERPARAMETERS = {"learning_rate": 5e-3, "batch_size": 8, "max_steps": 2, "checkpoint_every": 2}


def test_a_dama_job_from_an_sft_jobs_adapter(service: dict[str, Any], tmp_path: Path) -> None:
    client = httpx.Client(base_url=service["url"], headers={"Authorization": f"Bearer {service['key']}"}, timeout=60)
    train_zip, eval_zip = _dataset_zip(tmp_path / "data", n_train=16, n_eval=8)
    train = client.post("/datasets", files={"file": ("train.zip", train_zip, "application/zip")}).json()
    held_out = client.post("/datasets", files={"file": ("eval.zip", eval_zip, "application/zip")}).json()

    spec = {"model": "dama/tiny-llava", "dataset_id": train["id"], "hyperparameters": HYPERPARAMETERS}
    created = client.post("/jobs", json={**spec, "method": "sft"})
    assert created.status_code == 201, created.text
    sft = _wait(client, created.json()["id"], lambda job: job["status"] in ENDED)
    assert sft["status"] == "succeeded", sft

    chained = {**spec, "method": "dama", "init_adapter": sft["id"], "evaluation": {"dataset_id": held_out["id"]}}
    created = client.post("/jobs", json=chained)
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["init_adapter"] == sft["id"]
    dama = _wait(client, created.json()["id"], lambda job: job["status"] in ENDED)
    assert dama["status"] == "succeeded", dama
    result = dama["result"]

    # Held-out pairs before the first update: the policy is base + the sft adapter, and so is the reference.
    assert result["eval_before"]["eval_margin"] == pytest.approx(0.0, abs=1e-6)
    assert result["eval_before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)

    # Base against tuned: "base" is base + the starting adapter (the training's reference: the implicit rewards
    # equal the run's own held-out numbers after training), "plain_base" the model without adapters.
    evaluation = result["evaluation"]
    assert evaluation["init_adapter"] is not None
    preference = evaluation["preference"]
    assert {"plain_base", "base", "tuned"} <= set(preference)
    assert preference["plain_base"]["overall"]["count"] == preference["base"]["overall"]["count"] == 8
    assert preference["plain_base"]["overall"]["logp_chosen"] != pytest.approx(
        preference["base"]["overall"]["logp_chosen"], abs=1e-3
    )  # the sft adapter moved the model
    implicit, after = preference["implicit_reward"]["overall"], result["eval_after"]
    assert implicit["margin"] == pytest.approx(after["eval_margin"], abs=1e-5)
    assert implicit["loss"] == pytest.approx(after["eval_loss"], abs=1e-5)
    assert implicit["accuracy"] == pytest.approx(after["eval_accuracy"])

    # Both adapters load on the plain base; the dama one is the sft one trained further.
    sft_dir = _download_adapter(client, f"/jobs/{sft['id']}/adapter", tmp_path / "sft")
    dama_dir = _download_adapter(client, f"/jobs/{dama['id']}/adapter", tmp_path / "dama")
    _load_adapter(service, dama_dir)
    started = load_file(sft_dir / "adapter_model.safetensors")
    ended = load_file(dama_dir / "adapter_model.safetensors")
    assert started.keys() == ended.keys()
    assert all(not torch.equal(started[name], ended[name]) for name in started if "lora_B" in name)
    card = (dama_dir / "README.md").read_text()
    assert "| metric | plain base | base + starting adapter | tuned |" in card
