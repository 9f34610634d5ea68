"""A pair generation's pairs as an ordinary dataset of its tenant, usable by ``POST /jobs`` at once.

The engine writes its output atomically (``dama_engine.pairs``: a staging folder renamed into place); this module
moves the dataset part (``pairs.jsonl`` + ``images/``, each image once) into the dataset store as an upload's
``datasets/<id>/data`` would be, checks it as an upload is checked, publishes it, and describes the row
(:class:`NewDataset`) that the run's success records in the same transaction (``worker.tasks``). Until that commit
there is no row, so no API call can see or use the files: a worker killed in between leaves an unrecorded folder,
which the next attempt (the sweeper re-queues the run) replaces as a whole, since the dataset id is the run's own
(:func:`pair_dataset_id`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dama_engine.data import load_and_validate
from dama_engine.pairs import PairOutput
from jobstore.artifacts import ArtifactStore, file_sha256
from jobstore.quota import folder_bytes
from jobstore.redact import redact_json, strings_in

FORMAT = "trl"  # what the engine writes: TRL's conversational preference rows, scores and objects beside


@dataclass(frozen=True)
class NewDataset:
    """A dataset row to create with the run's success (keyword arguments of ``repository.create_dataset``) and its
    folder, removed when the success cannot be recorded (the tenant's storage would be over its quota)."""

    dataset_id: str
    tenant_id: str
    name: str
    row_count: int
    image_count: int
    size_bytes: int
    sha256: str
    path: str
    report: dict[str, Any]
    folder: Path

    def row(self) -> dict[str, Any]:
        values = {key: getattr(self, key) for key in ("dataset_id", "tenant_id", "name", "row_count", "image_count")}
        values.update(size_bytes=self.size_bytes, sha256=self.sha256, path=self.path, report=self.report)
        return {**values, "format": FORMAT}


def pair_dataset_id(run_id: str) -> str:
    """The dataset id of a pair generation's pairs: ``ds_`` + the run's own id part, the same on every attempt."""
    return "ds_" + run_id.split("_", 1)[1]


def store_pair_dataset(
    output: PairOutput, *, run_id: str, tenant_id: str, name: str | None, store: ArtifactStore
) -> NewDataset:
    """Move the output's dataset into ``store.dataset_dir(<id>)/data``, check it, publish it; the row to record."""
    dataset_id = pair_dataset_id(run_id)
    target = store.dataset_dir(dataset_id)
    store.remove(target)  # an earlier attempt's copy, never recorded
    data = target / "data"
    target.mkdir(parents=True)
    output.dataset_dir.rename(data)  # one volume (the store's root, or this worker's scratch): a rename
    rows, report = load_and_validate(data, format=FORMAT)
    if not report.ok:  # the engine's own output: a fault, not the tenant's input
        raise RuntimeError(f"the pairs written do not load as a {FORMAT} dataset: {report.to_dict()['errors'][:3]}")
    store.publish(target)
    return NewDataset(
        dataset_id=dataset_id,
        tenant_id=tenant_id,
        name=name or f"pairs from {run_id}",
        row_count=len(rows),
        image_count=sum(len(row.images) for row in rows),
        size_bytes=folder_bytes(data),
        sha256=file_sha256(data / output.dataset_path.name),
        path=store.recorded_path(data),
        report={**report.to_dict(), "source": {"pair_generation_id": run_id}},
        folder=target,
    )


def redact_report(output: PairOutput, report: dict[str, Any], *, spec: dict[str, Any]) -> dict[str, Any]:
    """The report without this worker's file paths (the staged set's, a built-in model's and the starting adapter's
    folders; the model and adapter as the request named them): rewritten in ``report.json``, which the tenant
    downloads, and returned for the run's result."""
    redacted: dict[str, Any] = redact_json(report, strings_in(spec))
    redacted.update(model=spec["model"], init_adapter=spec.get("init_adapter"))
    output.report_path.write_text(json.dumps(redacted, indent=2) + "\n", encoding="utf-8")
    return redacted
