"""A real DAMA worker whose training engine is fake: for exercising the claim path, not the model.

    celery -A benchmarks.fake_engine worker -Q <queue> --pool solo --concurrency 1

Everything but the engine is the product's own worker (:mod:`worker.celery_app`): the Celery task, fair-share
claiming in the job store, the engine config built from the stored spec, the reporter, heartbeats, the sweeper
thread, adapter packing and the outcome's recording. The engine (``worker.tasks.train``) is replaced by
:func:`fake_train`: it reports the ``training`` stage and ``hyperparameters.max_steps`` steps of
``FAKE_ENGINE_STEP_S`` seconds each (polling ``should_stop``, so cancellation works), then writes a two-file
adapter. Used by ``benchmarks/scale_sim.py`` and ``tests/worker/test_fair_share.py``.

With ``FAKE_ENGINE_LEDGER`` (a folder), each process appends one JSON line per claim (its duration, the job it
got or null) and per run (job, start, end) to ``<ledger>/<pid>.jsonl``: what the simulation's figures are built
from, independently of the job store's own record.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dama_engine.callbacks import Callback
from dama_engine.config import TrainConfig
from dama_engine.training.recipe import TrainResult
from worker import tasks

STEP_S = float(os.environ.get("FAKE_ENGINE_STEP_S", "0.1"))
LEDGER = os.environ.get("FAKE_ENGINE_LEDGER")


def record(entry: dict[str, Any]) -> None:
    """One line in this process's ledger file (no-op without ``FAKE_ENGINE_LEDGER``)."""
    if LEDGER is None:
        return
    entry["pid"] = os.getpid()
    with (Path(LEDGER) / f"{os.getpid()}.jsonl").open("a") as ledger:
        ledger.write(json.dumps(entry) + "\n")


def fake_train(config: TrainConfig, callback: Callback) -> TrainResult:
    """Stand-in for :func:`dama_engine.training.recipe.train`: sleeps through ``optim.max_steps`` steps, reporting
    each."""
    started = time.time()
    total = config.optim.max_steps or 1
    callback.on_stage("training", {"steps": total, "resumed_from_step": 0})
    done = 0
    for step in range(1, total + 1):
        if callback.should_stop():
            break
        time.sleep(STEP_S)
        callback.on_step(step, total, {"loss": 1.0 / step, "reward_margin": 0.1 * step})
        done = step
    stopped = done < total
    adapter = None
    if not stopped:
        callback.on_stage("exporting", {})
        adapter = Path(config.run.output_dir) / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "fake": True}))
        (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    record({"event": "run", "output_dir": str(config.run.output_dir), "start": started, "end": time.time()})
    return TrainResult(
        output_dir=Path(config.run.output_dir),
        adapter_dir=adapter,
        steps=done,
        total_steps=total,
        stopped=stopped,
        train_metrics={"loss": 1.0 / max(done, 1)},
        seconds=time.time() - started,
    )


def timed_claim(claim: Callable[..., Any]) -> Callable[..., Any]:
    """``worker.tasks._claim``, with each call's duration (the claim transaction, commit included) recorded."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        claimed = claim(*args, **kwargs)
        record(
            {
                "event": "claim",
                "seconds": time.perf_counter() - started,
                "at": time.time(),
                "job": claimed.job_id if claimed is not None else None,
                "tenant": claimed.tenant_id if claimed is not None else None,
            }
        )
        return claimed

    return wrapper


tasks.train = fake_train  # type: ignore[assignment]
tasks._claim = timed_claim(tasks._claim)  # type: ignore[assignment]

# Imported last: it builds the worker's Celery app from the environment (DAMA_*), tasks patched above.
from worker.celery_app import app  # noqa: E402

# The worker collects garbage after every job (worker.tasks._release_memory): with torch and transformers
# imported that pass walks their objects too, ~0.6 s of CPU per job here, which a real job's hours hide but
# would dominate sub-second fake jobs on two cores. Moving what imports made out of the collector's view keeps the
# pass (it still collects what each job leaves) without that cost.
gc.freeze()

__all__ = ["app"]
