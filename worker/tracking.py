"""Experiment tracking from the worker: a job's parameters, per-step metrics, evaluation results and adapter go to
the MLflow / W&B targets its spec names (``jobstore.tracking``: the operator defines them, the worker's environment
holds their credentials).

:class:`Tracking` is a callback beside the job's reporter. Every call to a tracker runs on one background thread
per job, so a slow or unreachable tracker never slows training, and its errors never reach the job: a tracker's
first error ends that tracker for the job and becomes a ``tracking`` event on it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dama_engine.callbacks import Callback
from jobstore.spec import JobSpec
from jobstore.tracking import TrackingTarget, experiment_name, wandb_project

log = logging.getLogger(__name__)

METRICS_PER_BATCH = 900  # MLflow's log_batch takes at most 1000 metrics
CLOSE_WAIT_S = 300.0  # at the end, how long the adapter upload and the last metrics may take


class Sink(Protocol):
    label: str

    def start(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, points: list[tuple[int, dict[str, float]]]) -> None: ...
    def log_results(self, results: dict[str, Any]) -> None: ...
    def log_adapter(self, folder: Path) -> None: ...
    def end(self, status: str) -> None: ...


class MlflowSink:
    """One MLflow run in experiment ``<tenant>/<experiment>`` of the target's tracking server."""

    def __init__(self, label: str, target: TrackingTarget, *, experiment: str, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        assert target.tracking_uri is not None
        self.label, self.experiment, self.run_name = label, experiment, run_name
        self.client = MlflowClient(tracking_uri=target.tracking_uri)
        self.run_id: str | None = None

    def start(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(self.experiment)
            except MlflowException:  # another job of the tenant created it just now
                again = self.client.get_experiment_by_name(self.experiment)
                if again is None:
                    raise
                experiment_id = again.experiment_id
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags={"dama.job_id": self.run_name})
        self.run_id = run.info.run_id
        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, points: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, values in points for key, value in values.items()]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def log_results(self, results: dict[str, Any]) -> None:
        assert self.run_id is not None
        self.client.log_dict(self.run_id, results, "evaluation.json")

    def log_adapter(self, folder: Path) -> None:
        assert self.run_id is not None
        self.client.log_artifacts(self.run_id, str(folder), artifact_path="adapter")

    def end(self, status: str) -> None:
        if self.run_id is not None:
            mlflow_status = {"succeeded": "FINISHED", "cancelled": "KILLED"}.get(status, "FAILED")
            self.client.set_terminated(self.run_id, status=mlflow_status)


class WandbSink:
    """One W&B run in project ``<project_prefix><tenant>``, grouped by the experiment (offline with
    ``WANDB_MODE=offline`` in the worker's environment)."""

    def __init__(
        self, label: str, target: TrackingTarget, *, project: str, group: str, run_name: str, folder: Path
    ) -> None:
        self.label, self.target, self.project, self.group, self.run_name = label, target, project, group, run_name
        self.folder = folder
        self.run: Any = None

    def start(self, params: dict[str, str]) -> None:
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            entity=self.target.entity,
            project=self.project,
            group=self.group,
            name=self.run_name,
            job_type="dama-training",
            config=params,
            dir=str(self.folder),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_metrics(self, points: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in points:
            self.run.log(values, step=step)

    def log_results(self, results: dict[str, Any]) -> None:
        self.run.summary.update({"evaluation": results})

    def log_adapter(self, folder: Path) -> None:
        import wandb

        artifact = wandb.Artifact(f"adapter-{self.run_name}", type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def end(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "succeeded" else 1)


def make_sinks(
    spec: JobSpec, targets: dict[str, TrackingTarget], *, tenant: str, job_id: str, folder: Path
) -> list[Sink]:
    sinks: list[Sink] = []
    for item in spec.integrations:
        target = targets.get(item.target)
        if target is None:  # removed from the settings after the job was accepted: reported by Tracking
            continue
        label = f"{item.target} ({target.kind})"
        if target.kind == "mlflow":
            experiment = experiment_name(tenant, item.experiment)
            sinks.append(MlflowSink(label, target, experiment=experiment, run_name=job_id))
        else:
            project = wandb_project(target, tenant)
            sinks.append(
                WandbSink(label, target, project=project, group=item.experiment, run_name=job_id, folder=folder)
            )
    return sinks


def make_tracking(
    spec: JobSpec,
    targets: dict[str, TrackingTarget],
    *,
    tenant: str,
    job_id: str,
    folder: Path,
    note: Callable[[str, dict[str, Any]], None],
) -> Tracking | None:
    """The job's tracking callback, or None when its spec names no target."""
    if not spec.integrations:
        return None
    for item in spec.integrations:
        if item.target not in targets:
            note(
                f"tracking target {item.target!r} is no longer defined on this service; skipped",
                {"tracker": item.target},
            )
    sinks = make_sinks(spec, targets, tenant=tenant, job_id=job_id, folder=folder)
    return Tracking(sinks, params=job_params(spec, job_id), note=note)


def job_params(spec: JobSpec, job_id: str) -> dict[str, str]:
    """The spec as flat ``dotted.name -> text`` parameters (what trackers compare runs by)."""
    flat: dict[str, str] = {"job_id": job_id}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = str(value)

    walk("", spec.model_dump(mode="json", exclude={"integrations"}))
    return flat


class Tracking(Callback):
    """Fans a run's reports out to its trackers on a background thread; ``note`` records what went wrong."""

    def __init__(self, sinks: list[Sink], *, params: dict[str, str], note: Callable[[str, dict[str, Any]], None]):
        self.note = note
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._failed: list[tuple[str, str]] = []  # (tracker, error), appended by the thread, reported by the caller
        self._sinks = sinks
        self._thread = threading.Thread(target=self._run, name="dama-tracking", daemon=True)
        self._thread.start()
        self._queue.put(("start", params))

    # ---- the callback side (the training thread) ---------------------------------------------------------------

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self._report_failures()

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self._queue.put(("metrics", (step, dict(metrics))))
        self._report_failures()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._queue.put(("metrics", (step, dict(metrics))))

    def finish(self, status: str, *, adapter: Path | None = None, results: dict[str, Any] | None = None) -> None:
        """Send the end of the run (evaluation results and the adapter when it succeeded) and wait for the thread."""
        if results:
            self._queue.put(("results", results))
        if adapter is not None:
            self._queue.put(("adapter", adapter))
        self._queue.put(("end", status))
        self._queue.put(None)
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive():
            self._failed.append(("all", f"still sending after {CLOSE_WAIT_S:.0f} s; given up"))
        self._report_failures()

    def _report_failures(self) -> None:
        while self._failed:
            label, error = self._failed.pop(0)
            self.note(f"tracking to {label} stopped: {error}", {"tracker": label, "error": error})

    # ---- the tracker side (the background thread) ----------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, payload = item
            if kind == "metrics":
                points = [payload]
                while len(points) < 100 and self._next_is_metrics():
                    points.append(self._queue.get_nowait()[1])  # type: ignore[index]
                payload = points
            for sink in list(self._sinks):
                self._call(sink, kind, payload)

    def _next_is_metrics(self) -> bool:
        with self._queue.mutex:
            return bool(self._queue.queue) and self._queue.queue[0] is not None and self._queue.queue[0][0] == "metrics"

    def _call(self, sink: Sink, kind: str, payload: Any) -> None:
        methods: dict[str, Callable[[Any], None]] = {
            "start": sink.start,
            "metrics": sink.log_metrics,
            "results": sink.log_results,
            "adapter": sink.log_adapter,
            "end": sink.end,
        }
        method = methods[kind]
        try:
            method(payload)
        except Exception as error:  # a tracker's fault is never the job's
            log.warning("tracking to %s failed (%s): %s", sink.label, kind, error)
            self._sinks.remove(sink)
            self._failed.append((sink.label, f"{type(error).__name__}: {str(error)[:300]}"))
            try:
                sink.end("failed")
            except Exception:
                log.debug("could not end the run of %s", sink.label, exc_info=True)
