"""Experiment-tracking targets: defined by the operator, picked by name in a job spec (torch-free: the API checks
names, the worker sends).

The operator lists targets in ``DAMA_TRACKING_TARGETS`` (JSON: name -> target). Credentials never appear here or
in a spec: the worker's environment holds them (MLflow: ``MLFLOW_TRACKING_TOKEN`` or ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``; W&B: ``WANDB_API_KEY``, or ``WANDB_MODE=offline``). A job names a target and an
experiment; the run lands in a per-tenant namespace (MLflow experiment ``<tenant>/<experiment>``, W&B project
``<project_prefix><tenant>`` with the experiment as the run group), so one tenant never writes into another's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TargetName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class TrackingTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlflow", "wandb"] = Field(description="mlflow (a tracking server) or wandb (Weights & Biases).")
    tracking_uri: str | None = Field(default=None, description="MLflow: the tracking server's URI.")
    entity: str | None = Field(default=None, description="W&B: the team or user the projects belong to.")
    project_prefix: str = Field(default="dama-", description="W&B: project name = prefix + tenant name.")

    @model_validator(mode="after")
    def _complete(self) -> TrackingTarget:
        if self.kind == "mlflow" and not self.tracking_uri:
            raise ValueError("an mlflow target needs tracking_uri")
        return self


def experiment_name(tenant: str, experiment: str) -> str:
    """The MLflow experiment of a tenant's experiment: the tenant's name first, so namespaces never overlap."""
    return f"{tenant}/{experiment}"


def wandb_project(target: TrackingTarget, tenant: str) -> str:
    return f"{target.project_prefix}{tenant}"
