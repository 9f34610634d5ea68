"""``OUTPUT/metrics.jsonl``: one JSON object per logged step (``{"step": N, ...metrics}``), the held-out evaluation
before training at step 0. A resumed run, in one process or under torchrun (the worker prepares the file before
it launches the ranks), drops what it will log again with :func:`truncate_metrics`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def logged_eval_before(path: Path) -> dict[str, float] | None:
    """The held-out metrics logged at step 0 (before training), or None."""
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line) if line else {}
        if record.get("step") == 0 and "eval_loss" in record:
            return {key: value for key, value in record.items() if key != "step"}
    return None


def truncate_metrics(path: Path, resumed_step: int) -> None:
    """Keep the lines up to ``resumed_step``, the step of the checkpoint a run resumes from; with none to resume
    from (``resumed_step`` 0 or less) the run logs everything again, from the evaluation before training: the file
    goes."""
    if not path.is_file():
        return
    if resumed_step <= 0:
        path.unlink()
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
    path.write_text("".join(line + "\n" for line in lines))
