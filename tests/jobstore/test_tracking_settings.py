"""DAMA_TRACKING_TARGETS: JSON in the environment, each target checked when the process starts."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from jobstore.settings import Settings
from jobstore.tracking import experiment_name, wandb_project


def test_targets_come_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    targets = {
        "team-mlflow": {"kind": "mlflow", "tracking_uri": "http://mlflow.internal:5000"},
        "team-wandb": {"kind": "wandb", "entity": "acme", "project_prefix": "dama-"},
    }
    monkeypatch.setenv("DAMA_TRACKING_TARGETS", json.dumps(targets))
    settings = Settings()
    assert settings.tracking_targets["team-mlflow"].tracking_uri == "http://mlflow.internal:5000"
    assert wandb_project(settings.tracking_targets["team-wandb"], "tenant-a") == "dama-tenant-a"
    assert experiment_name("tenant-a", "sweep") == "tenant-a/sweep"


def test_an_incomplete_or_unknown_target_stops_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAMA_TRACKING_TARGETS", json.dumps({"m": {"kind": "mlflow"}}))
    with pytest.raises(ValidationError, match="tracking_uri"):
        Settings()
    monkeypatch.setenv("DAMA_TRACKING_TARGETS", json.dumps({"m": {"kind": "neptune"}}))
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("DAMA_TRACKING_TARGETS", json.dumps({"m": {"kind": "wandb", "api_key": "secret"}}))
    with pytest.raises(ValidationError, match="api_key"):  # credentials are never settings
        Settings()
