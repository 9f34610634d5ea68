"""The client commands of ``dama`` (``dama datasets|jobs|evaluations|pairs|loops|keys|webhooks|models|health``,
``dama chat|chat-models|usage`` ...).

``api.cli.main`` hands these commands here before importing anything of the server, so they work where only the
``client`` extra is installed. The service is ``--api-url`` / ``DAMA_API_URL``, the key ``--api-key`` /
``DAMA_API_KEY``.
Every command takes ``--json`` (machine-readable output on stdout); a failure exits non-zero with the API's message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from dama_client.client import Client, FollowUpdate, RunResource, RunT, _drop_none, user_message
from dama_client.errors import APIError, DamaError
from dama_client.estimate_report import OPTION_COLUMNS, advice_lines, summary_lines
from dama_client.models import Loop, PairGeneration, Run

COMMANDS = frozenset({"datasets", "jobs", "evaluations", "pairs", "loops", "keys", "webhooks", "models", "health"})

Handler = Callable[[Client, argparse.Namespace], int]


# ---- output -----------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _emit(args: argparse.Namespace, value: Any, columns: Sequence[str] = ()) -> None:
    """``--json``: the JSON document; otherwise one line per item with ``columns`` (or key: value lines)."""
    data = _plain(value)
    if args.json:
        print(json.dumps(data, indent=2))
        return
    if isinstance(data, list):
        rows = [[str(item[column]) if item.get(column) is not None else "-" for column in columns] for item in data]
        widths = [max(len(cell) for cell in cells) for cells in zip(columns, *rows, strict=True)]
        for cells in (list(columns), *rows):  # a header row, then the items, in aligned columns
            print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())
        return
    if isinstance(data, dict):
        for key, item in data.items():
            shown = json.dumps(item) if isinstance(item, dict | list) else item
            print(f"{key}: {shown}")
        return
    print(data)


class _ByteBar:
    """A byte-progress callback drawing a tqdm bar on stderr, made at the first byte (none with --json)."""

    def __init__(self, args: argparse.Namespace, description: str) -> None:
        self.enabled, self.description = not args.json, description
        self.bar: Any = None

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                desc=self.description, total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- datasets ---------------------------------------------------------------------------------------------------

DATASET_COLUMNS = ("id", "name", "format", "row_count", "image_count", "created_at")


def _datasets_upload(client: Client, args: argparse.Namespace) -> int:
    progress = _ByteBar(args, "upload")
    try:
        dataset = client.datasets.upload(args.file, name=args.name, format=args.format, progress=progress)
    finally:
        progress.close()
    _emit(args, dataset)
    return 0


def _datasets_list(client: Client, args: argparse.Namespace) -> int:
    _emit(args, list(client.datasets.list()), DATASET_COLUMNS)
    return 0


def _datasets_show(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.datasets.get(args.id))
    return 0


def _datasets_delete(client: Client, args: argparse.Namespace) -> int:
    client.datasets.delete(args.id)
    _emit(args, {"id": args.id, "deleted": True})
    return 0


def _datasets_rows(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.datasets.rows(args.id, offset=args.offset, limit=args.limit))
    return 0


def _datasets_hardness(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.datasets.hardness(args.id, bins=args.bins))
    return 0


# ---- jobs -------------------------------------------------------------------------------------------------------

LOCAL_BUILD_MODULE = "worker.build_model"  # `dama models build`, run by the full `dama` (api.cli) as python -m
MISSING_KEY = (
    "no API key: set DAMA_API_KEY to the key `dama admin create-key` (or `dama keys create`) printed, or pass "
    "--api-key KEY"
)
JOB_COLUMNS = ("id", "status", "stage", "step", "total_steps", "dataset_id", "created_at")


def _parse_value(text: str) -> Any:
    """``--set`` values are JSON when they parse as JSON (numbers, true, null, lists), strings otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def spec_from_sets(sets: Iterable[str]) -> dict[str, Any]:
    """``key=value`` settings as a job-spec fragment: a bare key is a hyperparameter (``learning_rate=5e-3``); a
    dotted key is a path in the spec (``lora.r=8``, ``evaluation.dataset_id=ds_...``)."""
    spec: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DamaError(f"--set {item!r}: expected key=value")
        _set_path(spec, key if "." in key else f"hyperparameters.{key}", _parse_value(value))
    return spec


def _set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set the dotted ``path`` (``training.hyperparameters.max_steps``) of ``spec`` to ``value``."""
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DamaError(f"--set {path}: {part} is already a value")
    node[last] = value


def _jobs_create(client: Client, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = json.loads(args.spec) if args.spec else {}
    if not isinstance(spec, dict):
        raise DamaError("--spec: expected a JSON object")
    for key, value in spec_from_sets(args.set or []).items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    if args.eval_dataset:
        spec.setdefault("evaluation", {})["dataset_id"] = args.eval_dataset
    if args.estimate:
        return _jobs_estimate(client, args, spec)
    job = client.jobs.create(model=args.model, dataset_id=args.dataset, method=args.method, **spec)
    if not args.follow:
        _emit(args, job)
        return 0
    if not args.json:
        print(f"created {job.id}", file=sys.stderr)
    return _follow(client.jobs, args, job.id, _final_summary)


def _jobs_estimate(client: Client, args: argparse.Namespace, spec: dict[str, Any]) -> int:
    """``--estimate``: what the job would take, instead of creating it (waiting for a worker's answer); exit 1
    unless the estimate succeeded."""
    if args.follow:
        raise DamaError("--estimate creates no job to --follow: leave one of them out")
    estimate = client.jobs.estimate(model=args.model, dataset_id=args.dataset, method=args.method, **spec)
    if not estimate.ended:
        if not args.json:
            print(f"estimate {estimate.id} is {estimate.status} on queue {estimate.queue}: waiting", file=sys.stderr)
        estimate = client.jobs.wait_estimate(estimate.id)
    if args.json or estimate.estimate is None:
        _emit(args, estimate)
        return 0 if estimate.status == "succeeded" else 1
    print(f"estimate {estimate.id} (queue {estimate.queue}), nothing was queued:")
    for line in summary_lines(estimate.estimate):
        print(line)
    print("options (peak memory per GPU under other settings):")
    _emit(args, estimate.estimate.get("options") or [], OPTION_COLUMNS)
    for line in advice_lines(estimate.estimate):
        print(line)
    return 0


def _jobs_list(client: Client, args: argparse.Namespace) -> int:
    jobs = client.jobs.list(status=args.status)
    _emit(args, [job for _, job in zip(range(args.limit), jobs, strict=False)], JOB_COLUMNS)
    return 0


def _jobs_show(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.jobs.get(args.id))
    return 0


def _jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.jobs.cancel(args.id))
    return 0


def _jobs_events(client: Client, args: argparse.Namespace) -> int:
    events = client.jobs.stream_events(args.id) if args.follow else client.jobs.events(args.id)
    for event in events:
        if args.json:
            print(event.model_dump_json())
        else:
            print(f"{event.seq:>4}  {event.created_at:%H:%M:%S}  {event.type:<10}  {event.message}", flush=True)
    return 0


def _jobs_metrics(client: Client, args: argparse.Namespace) -> int:
    metrics = client.jobs.metrics(args.id, keys=args.keys.split(",") if args.keys else None)
    if args.json:
        _emit(args, metrics)
    else:
        for key, series in sorted(metrics.series.items()):
            step, value = series[-1] if series else (None, None)
            print(f"{key}: {len(series)} points, last {value} at step {step}")
    return 0


def _jobs_checkpoints(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.jobs.checkpoints(args.id), ("id", "step", "created_at"))
    return 0


def _jobs_download(client: Client, args: argparse.Namespace) -> int:
    progress = _ByteBar(args, "download")
    try:
        if args.step is not None:
            path = client.jobs.download_checkpoint(args.id, args.step, args.output, progress=progress)
        else:
            path = client.jobs.download(args.id, args.output, progress=progress)
    finally:
        progress.close()
    _emit(args, {"job_id": args.id, "path": str(path), "sha256_verified": True} if args.json else str(path))
    return 0


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _final_summary(job: Any) -> dict[str, Any]:
    result = job.result or {}
    summary: dict[str, Any] = {"id": job.id, "status": job.status}
    for key in ("eval_before", "eval_after", "train_metrics", "metrics"):
        if isinstance(result.get(key), dict):
            summary[key] = result[key]
    if job.error:
        summary["error"] = job.error
    return summary


def _follow(
    runs: RunResource[RunT],
    args: argparse.Namespace,
    job_id: str,
    summary: Callable[[RunT], dict[str, Any]],
    unit: str = "step",
) -> int:
    """A live bar (step of total steps, the stage, the service's ETA) and the events, then ``summary`` of the run
    (a job's final metrics); exits 0 when it succeeded."""
    job: RunT | None = None
    if args.json:
        for update in runs.follow(job_id):
            for event in update.events:
                print(event.model_dump_json(), flush=True)
            job = update.job
    else:
        job = _follow_with_bar(runs, job_id, unit)
    assert job is not None  # follow yields at least once
    if args.json:
        print(job.model_dump_json())
    else:
        for key, value in summary(job).items():
            if not isinstance(value, dict):
                print(f"{key}: {value}")
                continue
            print(f"{key}:")
            for name, item in sorted(value.items()):
                print(f"  {name}: {format(item, '.4g') if isinstance(item, float) else json.dumps(item)}")
    return 0 if job.status == "succeeded" else 1


def _follow_with_bar(runs: RunResource[RunT], job_id: str, unit: str) -> RunT:
    from tqdm import tqdm

    bar = tqdm(total=None, unit=unit, file=sys.stderr, dynamic_ncols=True)
    update: FollowUpdate[RunT] | None = None
    try:
        for update in runs.follow(job_id):
            for event in update.events:
                if event.type != "log" or event.data:
                    bar.write(f"[{event.type}] {event.message}", file=sys.stderr)
            job = update.job
            total, step = getattr(job, "total_steps", None), getattr(job, "step", 0)
            if total and bar.total != total:
                bar.total = total
                bar.refresh()
            bar.set_description(f"{job.status}:{job.stage or '-'}", refresh=False)
            bar.set_postfix_str(
                "done" if job.ended else f"eta {_eta(getattr(job, 'eta_seconds', None))}", refresh=False
            )
            bar.update(max(0, step - bar.n))
    finally:
        bar.close()
    assert update is not None
    return update.job


def _jobs_follow(client: Client, args: argparse.Namespace) -> int:
    return _follow(client.jobs, args, args.id, _final_summary)


def _jobs_export(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.jobs.create_export(args.id, format=args.format))
    return 0


def _jobs_exports(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.jobs.list_exports(args.id), ("id", "format", "status", "size_bytes", "created_at"))
    return 0


def _jobs_download_export(client: Client, args: argparse.Namespace) -> int:
    progress = _ByteBar(args, "download")
    try:
        path = client.jobs.download_export(args.id, args.export_id, args.output, progress=progress)
    finally:
        progress.close()
    _emit(args, {"job_id": args.id, "export_id": args.export_id, "path": str(path)} if args.json else str(path))
    return 0


# ---- evaluations --------------------------------------------------------------------------------------------------

EVAL_COLUMNS = ("id", "status", "stage", "percent", "created_at")


def _evaluations_create(client: Client, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = json.loads(args.spec) if args.spec else {}
    spec.update({key: value for key, value in spec_from_sets(args.set or []).items()})
    spec.update({k: v for k, v in {"model": args.model, "dataset_id": args.dataset, "job_id": args.job}.items() if v})
    _emit(args, client.evaluations.create(**spec))
    return 0


def _evaluations_list(client: Client, args: argparse.Namespace) -> int:
    items = client.evaluations.list(status=args.status)
    _emit(args, [item for _, item in zip(range(args.limit), items, strict=False)], EVAL_COLUMNS)
    return 0


def _evaluations_show(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.evaluations.get(args.id))
    return 0


def _evaluations_cancel(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.evaluations.cancel(args.id))
    return 0


def _evaluations_events(client: Client, args: argparse.Namespace) -> int:
    events = client.evaluations.stream_events(args.id) if args.follow else client.evaluations.events(args.id)
    for event in events:
        print(event.model_dump_json() if args.json else f"{event.seq:>4}  {event.type:<10}  {event.message}")
    return 0


def _evaluations_outputs(client: Client, args: argparse.Namespace) -> int:
    sys.stdout.buffer.write(client.evaluations.outputs(args.id, file=args.file))
    return 0


def _evaluations_chart(client: Client, args: argparse.Namespace) -> int:
    with open(args.output, "wb") as out:
        out.write(client.evaluations.chart(args.id))
    _emit(args, {"path": args.output} if args.json else args.output)
    return 0


# ---- pairs (pair generations) ---------------------------------------------------------------------------------------

PAIRS_COLUMNS = ("id", "status", "stage", "step", "total_steps", "dataset_id", "created_at")


def _pairs_summary(run: PairGeneration) -> dict[str, Any]:
    """The outcome: the dataset made and the report's counts, or the error (what was tried, what to change)."""
    summary: dict[str, Any] = {"id": run.id, "status": run.status, "dataset_id": run.dataset_id}
    report = run.report or {}
    for key in ("prompts_tried", "pairs", "samples", "faithful_samples", "hallucinating_samples"):
        if key in report:
            summary[key] = report[key]
    if run.error:
        summary["error"] = run.error.get("message")
    return summary


def _pairs_generate(client: Client, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = json.loads(args.spec) if args.spec else {}
    if not isinstance(spec, dict):
        raise DamaError("--spec: expected a JSON object")
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DamaError(f"--set {item!r}: expected key=value")
        spec[key] = _parse_value(value)
    options = {"samples_per_prompt": args.samples, "temperature": args.temperature, "max_prompts": args.max_prompts}
    spec.update({key: value for key, value in options.items() if value is not None})
    if args.adapter:
        spec["init_adapter"] = args.adapter
    if args.judge:
        spec["judge"] = args.judge
    run = client.pair_generations.create(model=args.model, generative_dataset_id=args.dataset, **spec)
    if not args.follow:
        _emit(args, run)
        return 0
    if not args.json:
        print(f"created {run.id}", file=sys.stderr)
    return _follow(client.pair_generations, args, run.id, _pairs_summary, unit="prompt")


def _pairs_list(client: Client, args: argparse.Namespace) -> int:
    runs = client.pair_generations.list(status=args.status)
    _emit(args, [run for _, run in zip(range(args.limit), runs, strict=False)], PAIRS_COLUMNS)
    return 0


def _pairs_show(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.pair_generations.get(args.id))
    return 0


def _pairs_cancel(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.pair_generations.cancel(args.id))
    return 0


def _pairs_follow(client: Client, args: argparse.Namespace) -> int:
    return _follow(client.pair_generations, args, args.id, _pairs_summary, unit="prompt")


def _pairs_events(client: Client, args: argparse.Namespace) -> int:
    runs = client.pair_generations
    for event in runs.stream_events(args.id) if args.follow else runs.events(args.id):
        print(event.model_dump_json() if args.json else f"{event.seq:>4}  {event.type:<10}  {event.message}")
    return 0


def _pairs_outputs(client: Client, args: argparse.Namespace) -> int:
    content = client.pair_generations.outputs(args.id, file=args.file)
    if args.output:
        with open(args.output, "wb") as out:
            out.write(content)
        _emit(args, {"path": args.output} if args.json else args.output)
    else:
        sys.stdout.buffer.write(content)
    return 0


# ---- loops ---------------------------------------------------------------------------------------------------------

LOOP_COLUMNS = ("id", "status", "stage", "step", "total_steps", "created_at")
ROUND_FIGURES = (("chair_i", "CHAIR_i"), ("chair_s", "CHAIR_s"), ("coverage", "coverage"), ("pope_f1", "POPE F1"))


def _figures(metrics: dict[str, Any] | None) -> str:
    values = metrics or {}
    shown = [f"{name} {values[key]:.3f}" for key, name in ROUND_FIGURES if isinstance(values.get(key), int | float)]
    return ", ".join(shown) or "no figures"


def _loop_summary(loop: Loop) -> dict[str, Any]:
    """The base's held-out figures, then each round's (with its pairs), or the error."""
    summary: dict[str, Any] = {"id": loop.id, "status": loop.status, "base": _figures(loop.base)}
    for entry in loop.rounds:
        pairs = f"{entry.pairs} pairs; " if entry.pairs is not None else ""
        summary[f"round {entry.round}"] = f"{entry.status}: {pairs}{_figures(entry.metrics)}"
    if loop.error:
        summary["error"] = loop.error.get("message")
    return summary


def _loops_create(client: Client, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = json.loads(args.spec) if args.spec else {}
    if not isinstance(spec, dict):
        raise DamaError("--spec: expected a JSON object")
    for item in args.set or []:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise DamaError(f"--set {item!r}: expected key=value (a dotted path: training.method=dama)")
        _set_path(spec, path, _parse_value(value))
    if args.adapter:
        spec["init_adapter"] = args.adapter
    loop = client.loops.create(
        model=args.model,
        generative_dataset_id=args.dataset,
        held_out_dataset_id=args.held_out,
        rounds=args.rounds,
        **spec,
    )
    if not args.follow:
        _emit(args, loop)
        return 0
    if not args.json:
        print(f"created {loop.id}", file=sys.stderr)
    return _loops_follow_id(client, args, loop.id)


def _loops_follow_id(client: Client, args: argparse.Namespace, loop_id: str) -> int:
    if args.json:
        return _follow(client.loops, args, loop_id, _loop_summary)
    loop = _follow_stages(client, loop_id)
    for key, value in _loop_summary(loop).items():
        print(f"{key}: {value}")
    return 0 if loop.status == "succeeded" else 1


RUN_RESOURCES = {"pair_generation": "pair_generations", "job": "jobs", "evaluation": "evaluations"}
STAGE_UNITS = {"pair_generation": "prompt", "job": "step", "evaluation": "%"}


def _follow_stages(client: Client, loop_id: str, interval: float = 1.0) -> Loop:
    """A bar per stage (the current run's step of its total, its stage and ETA) and a line per finished round."""
    import time

    from tqdm import tqdm

    bar: Any = None
    current: str | None = None
    reported: set[int] = set()
    try:
        while True:
            loop = client.loops.get(loop_id)
            for entry in loop.rounds:
                if entry.metrics is not None and entry.round not in reported:
                    reported.add(entry.round)
                    line = f"round {entry.round}: {entry.pairs} pairs; {_figures(entry.metrics)}"
                    (bar.write if bar is not None else print)(line, file=sys.stderr)
            running = [
                (entry.round, run)
                for entry in loop.rounds
                for run in (entry.pair_generation, entry.job, entry.evaluation)
                if run is not None and run["status"] not in ("succeeded", "failed", "cancelled")
            ]
            if running:
                number, brief = running[0]
                if brief["id"] != current:
                    if bar is not None:
                        bar.close()
                    current = brief["id"]
                    bar = tqdm(
                        total=100,
                        unit=STAGE_UNITS[brief["object"]],
                        desc=f"round {number} {brief['object']} {brief['id']}",
                        file=sys.stderr,
                        dynamic_ncols=True,
                    )
                run: Run = getattr(client, RUN_RESOURCES[brief["object"]]).get(brief["id"])
                # Steps of a total where the run counts them (prompts, optimizer steps), else its percent.
                total = getattr(run, "total_steps", None)
                bar.total = total or 100
                bar.n = (getattr(run, "step", 0) or 0) if total else round(run.percent or 0)
                bar.set_postfix_str(f"{run.status}:{run.stage or '-'} eta {_eta(run.eta_seconds)}", refresh=False)
                bar.refresh()
            if loop.ended:
                return loop
            time.sleep(interval)
    finally:
        if bar is not None:
            bar.close()


def _loops_list(client: Client, args: argparse.Namespace) -> int:
    loops = client.loops.list(status=args.status)
    _emit(args, [loop for _, loop in zip(range(args.limit), loops, strict=False)], LOOP_COLUMNS)
    return 0


def _loops_show(client: Client, args: argparse.Namespace) -> int:
    loop = client.loops.get(args.id)
    if args.json:
        _emit(args, loop)
        return 0
    for key, value in _loop_summary(loop).items():
        print(f"{key}: {value}")
    return 0


def _loops_cancel(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.loops.cancel(args.id))
    return 0


def _loops_follow(client: Client, args: argparse.Namespace) -> int:
    return _loops_follow_id(client, args, args.id)


def _loops_events(client: Client, args: argparse.Namespace) -> int:
    loops = client.loops
    for event in loops.stream_events(args.id) if args.follow else loops.events(args.id):
        print(event.model_dump_json() if args.json else f"{event.seq:>4}  {event.type:<10}  {event.message}")
    return 0


# ---- keys, webhooks, models, health -------------------------------------------------------------------------------


def _keys_create(client: Client, args: argparse.Namespace) -> int:
    key = client.keys.create()
    if args.json:
        _emit(args, key)
    else:  # the secret alone on stdout (scripts capture it)
        print(key.secret)
        print(f"created key {key.id}; the secret is not shown again", file=sys.stderr)
    return 0


def _keys_list(client: Client, args: argparse.Namespace) -> int:
    _emit(args, list(client.keys.list()), ("id", "prefix", "created_at", "revoked_at"))
    return 0


def _keys_revoke(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.keys.revoke(args.id))
    return 0


WEBHOOK_COLUMNS = ("id", "status", "url", "event_types")


def _webhooks_create(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.webhooks.create(url=args.url, event_types=args.event, description=args.description))
    return 0


def _webhooks_list(client: Client, args: argparse.Namespace) -> int:
    _emit(args, list(client.webhooks.list()), WEBHOOK_COLUMNS)
    return 0


def _webhooks_show(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.webhooks.get(args.id))
    return 0


def _webhooks_update(client: Client, args: argparse.Namespace) -> int:
    enabled = {"enable": True, "disable": False}.get(args.state or "")
    hook = client.webhooks.update(
        args.id, url=args.url, event_types=args.event, description=args.description, enabled=enabled
    )
    _emit(args, hook)
    return 0


def _webhooks_delete(client: Client, args: argparse.Namespace) -> int:
    client.webhooks.delete(args.id)
    _emit(args, {"id": args.id, "deleted": True})
    return 0


def _webhooks_deliveries(client: Client, args: argparse.Namespace) -> int:
    items = client.webhooks.deliveries(args.id)
    shown = [item for _, item in zip(range(args.limit), items, strict=False)]
    _emit(args, shown, ("id", "event_type", "status", "attempt_count", "created_at"))
    return 0


def _webhooks_redeliver(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.webhooks.redeliver(args.id, args.delivery_id))
    return 0


def _models_list(client: Client, args: argparse.Namespace) -> int:
    catalog = client.models.list()
    if args.json:
        _emit(args, catalog)
    else:
        for tiny in catalog.tiny_models:
            print(f"{tiny['name']}  ({tiny['family']}, built in)")
        for family in catalog.families:
            print(f"{family['name']}: model types {', '.join(family['model_types'])}")
        scorer = catalog.hardness_scorer or "none (dama and dama_data need rows with hardness or scores)"
        print(f"hardness scorer: {scorer}")
    return 0


def _chat(client: Client, args: argparse.Namespace) -> int:
    """Stream one answer to the terminal (``--json``: the whole completion object instead)."""
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append(user_message(args.prompt, *args.image))
    params = _drop_none(
        {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    )
    if args.json:
        _emit(args, client.chat.complete(model=args.model, messages=messages, **params))
        return 0
    usage: dict[str, int] | None = None
    for chunk in client.chat.stream(
        model=args.model, messages=messages, stream_options={"include_usage": True}, **params
    ):
        print(chunk.text, end="", flush=True)
        usage = chunk.usage or usage
    print()
    if usage:
        print(f"[{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens]", file=sys.stderr)
    return 0


def _chat_models(client: Client, args: argparse.Namespace) -> int:
    models = client.chat.models()
    if args.json:
        _emit(args, models)
    else:
        for model in models.data:
            print(f"{model.id}  ({'base' if model.base_model is None else 'tuned ' + model.base_model})")
    return 0


def _usage(client: Client, args: argparse.Namespace) -> int:
    usage = client.usage.get(start_date=args.start, end_date=args.end)
    if args.json:
        _emit(args, usage)
        return 0
    for line in usage.data:
        tokens = f"{line.prompt_tokens} + {line.completion_tokens} tokens"
        print(f"{line.date}  {line.model}  {line.requests} requests  {tokens}")
    print(
        f"{usage.start_date} .. {usage.end_date}: {usage.total_requests} requests, "
        f"{usage.total_prompt_tokens} prompt + {usage.total_completion_tokens} completion tokens"
    )
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    _emit(args, client.health.ready() if args.ready else client.health.live())
    return 0


# ---- parser -------------------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON on stdout (for scripts)")
    common.add_argument("--api-url", default=None, help="the service (default DAMA_API_URL, http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=None, help="the API key (default DAMA_API_KEY)")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    return common


def add_commands(commands: Any) -> None:
    """Add the client commands to ``dama``'s sub-command parsers."""
    common = _common()

    def group(name: str, help_text: str) -> Any:
        parser = commands.add_parser(name, help=help_text)
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    def leaf(subs: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subs.add_parser(name, help=help_text, parents=[common])
        parser.set_defaults(client_handler=handler)
        return parser

    datasets = group("datasets", "upload and inspect datasets")
    upload = leaf(datasets, "upload", _datasets_upload, "upload a data file or archive")
    upload.add_argument("file")
    upload.add_argument("--name", default=None)
    upload.add_argument("--format", default=None, help="auto (default), trl, rlaif_v, openai, generative, prompts")
    leaf(datasets, "list", _datasets_list, "list datasets")
    for name, handler, text in (("show", _datasets_show, "show a dataset"), ("delete", _datasets_delete, "delete")):
        leaf(datasets, name, handler, text).add_argument("id")
    rows = leaf(datasets, "rows", _datasets_rows, "preview rows")
    rows.add_argument("id")
    rows.add_argument("--offset", type=int, default=0)
    rows.add_argument("--limit", type=int, default=10)
    hardness = leaf(datasets, "hardness", _datasets_hardness, "hardness histogram")
    hardness.add_argument("id")
    hardness.add_argument("--bins", type=int, default=None)

    jobs = group("jobs", "create, follow and download training jobs")
    create = leaf(jobs, "create", _jobs_create, "create a training job")
    create.add_argument("--model", required=True, help="base model (a hub id or dama/tiny-*)")
    create.add_argument("--dataset", required=True, help="training dataset id")
    create.add_argument("--method", default=None, help="dama (default), dpo, ...")
    create.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a hyperparameter (learning_rate=5e-3) or a dotted spec path (lora.r=8); repeatable",
    )
    create.add_argument("--eval-dataset", default=None, help="held-out preference dataset id")
    create.add_argument("--spec", default=None, help="more of the job spec, as a JSON object")
    create.add_argument("--follow", action="store_true", help="then follow it to its end")
    create.add_argument(
        "--estimate",
        action="store_true",
        help="create nothing: print what the job would take (rows, steps, tokens, peak memory per GPU, time, "
        "whether it fits the service's GPUs, what to change)",
    )
    jobs_list = leaf(jobs, "list", _jobs_list, "list jobs, newest first")
    jobs_list.add_argument("--status", default=None)
    jobs_list.add_argument("--limit", type=int, default=20)
    for name, handler, text in (
        ("show", _jobs_show, "show a job"),
        ("cancel", _jobs_cancel, "cancel a job"),
        ("follow", _jobs_follow, "follow a job live (progress, stage, ETA), then print its final metrics"),
        ("checkpoints", _jobs_checkpoints, "list kept checkpoints"),
        ("exports", _jobs_exports, "list merged exports"),
    ):
        leaf(jobs, name, handler, text).add_argument("id")
    events = leaf(jobs, "events", _jobs_events, "print a job's events")
    events.add_argument("id")
    events.add_argument("--follow", action="store_true", help="stream them live until the job ends")
    metrics = leaf(jobs, "metrics", _jobs_metrics, "metric series")
    metrics.add_argument("id")
    metrics.add_argument("--keys", default=None, help="comma-separated metric keys")
    download = leaf(jobs, "download", _jobs_download, "download the adapter (sha256 checked) and unpack it")
    download.add_argument("id")
    download.add_argument("-o", "--output", default=".", help="folder to unpack into (default .)")
    download.add_argument("--step", type=int, default=None, help="a kept checkpoint instead of the final adapter")
    export = leaf(jobs, "export", _jobs_export, "ask for a merged export")
    export.add_argument("id")
    export.add_argument("--format", default="merged")
    export_download = leaf(jobs, "download-export", _jobs_download_export, "download an export and unpack it")
    export_download.add_argument("id")
    export_download.add_argument("export_id")
    export_download.add_argument("-o", "--output", default=".")

    evaluations = group("evaluations", "score models and adapters")
    evaluation = leaf(evaluations, "create", _evaluations_create, "create an evaluation")
    evaluation.add_argument("--model", default=None)
    evaluation.add_argument("--dataset", default=None, help="evaluation dataset id")
    evaluation.add_argument("--job", default=None, help="a training job whose adapter is scored")
    evaluation.add_argument("--set", action="append", metavar="KEY=VALUE", help="a dotted spec path; repeatable")
    evaluation.add_argument("--spec", default=None, help="the evaluation spec, as a JSON object")
    evaluations_list = leaf(evaluations, "list", _evaluations_list, "list evaluations")
    evaluations_list.add_argument("--status", default=None)
    evaluations_list.add_argument("--limit", type=int, default=20)
    for name, handler, text in (("show", _evaluations_show, "show"), ("cancel", _evaluations_cancel, "cancel")):
        leaf(evaluations, name, handler, text).add_argument("id")
    evaluation_events = leaf(evaluations, "events", _evaluations_events, "print an evaluation's events")
    evaluation_events.add_argument("id")
    evaluation_events.add_argument("--follow", action="store_true")
    outputs = leaf(evaluations, "outputs", _evaluations_outputs, "print the generated outputs (JSON lines)")
    outputs.add_argument("id")
    outputs.add_argument("--file", default=None)
    chart = leaf(evaluations, "chart", _evaluations_chart, "save the results chart (PNG)")
    chart.add_argument("id")
    chart.add_argument("-o", "--output", default="chart.png")

    pairs = group("pairs", "preference pairs sampled from your model on a generative set")
    generate = leaf(pairs, "generate", _pairs_generate, "start a pair generation (--follow: to its end)")
    generate.add_argument("--model", required=True, help="base model (a hub id or dama/tiny-*)")
    generate.add_argument(
        "--dataset", required=True, help="generative dataset id (image, prompt, objects), or a prompt set's (--judge)"
    )
    generate.add_argument("--judge", default=None, help="for a prompt set: the service's judge that lists objects")
    generate.add_argument("--adapter", default=None, help="sample base + this job's adapter: job_... or job_...:STEP")
    generate.add_argument("--samples", type=int, default=None, help="samples per prompt (default 8)")
    generate.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    generate.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    generate.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="a request field (top_p=0.9, seed=1); repeatable"
    )
    generate.add_argument("--spec", default=None, help="more of the request, as a JSON object")
    generate.add_argument("--follow", action="store_true", help="then follow it to its end")
    pairs_list = leaf(pairs, "list", _pairs_list, "list pair generations, newest first")
    pairs_list.add_argument("--status", default=None)
    pairs_list.add_argument("--limit", type=int, default=20)
    for name, handler, text in (
        ("show", _pairs_show, "show a pair generation"),
        ("cancel", _pairs_cancel, "cancel a pair generation"),
        ("follow", _pairs_follow, "follow one live (prompts, stage, ETA), then print its outcome"),
    ):
        leaf(pairs, name, handler, text).add_argument("id")
    pairs_events = leaf(pairs, "events", _pairs_events, "print a pair generation's events")
    pairs_events.add_argument("id")
    pairs_events.add_argument("--follow", action="store_true")
    pairs_outputs = leaf(pairs, "outputs", _pairs_outputs, "the per-sample file (JSON lines), report or chart")
    pairs_outputs.add_argument("id")
    pairs_outputs.add_argument("--file", choices=["samples", "report", "chart"], default=None)
    pairs_outputs.add_argument("-o", "--output", default=None, help="write to this file (default: stdout)")

    loops = group("loops", "rounds of sample -> train -> evaluate on the server")
    loop = leaf(loops, "create", _loops_create, "start a loop (--follow: a bar per stage, a line per round)")
    loop.add_argument("--model", required=True, help="base model (a hub id or dama/tiny-*)")
    loop.add_argument("--dataset", required=True, help="generative dataset id the rounds sample pairs from")
    loop.add_argument("--held-out", required=True, help="generative dataset id each round is evaluated on")
    loop.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    loop.add_argument("--adapter", default=None, help="start round 1 from this job's adapter: job_... or job_...:STEP")
    loop.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a dotted request path (training.method=dama, sampling.seed=1); repeatable",
    )
    loop.add_argument("--spec", default=None, help="more of the request, as a JSON object")
    loop.add_argument("--follow", action="store_true", help="then follow it to its end")
    loops_list = leaf(loops, "list", _loops_list, "list loops, newest first")
    loops_list.add_argument("--status", default=None)
    loops_list.add_argument("--limit", type=int, default=20)
    for name, handler, text in (
        ("show", _loops_show, "show a loop: the base's and each round's figures"),
        ("cancel", _loops_cancel, "cancel a loop and its current run"),
        ("follow", _loops_follow, "follow a loop live: a bar per stage, a line per finished round"),
    ):
        leaf(loops, name, handler, text).add_argument("id")
    loops_events = leaf(loops, "events", _loops_events, "print a loop's events")
    loops_events.add_argument("id")
    loops_events.add_argument("--follow", action="store_true")

    keys = group("keys", "your tenant's API keys")
    leaf(keys, "create", _keys_create, "create a key (the secret is printed once)")
    leaf(keys, "list", _keys_list, "list keys")
    leaf(keys, "revoke", _keys_revoke, "revoke a key").add_argument("id")

    webhooks = group("webhooks", "webhook endpoints and deliveries")
    hook = leaf(webhooks, "create", _webhooks_create, "register an endpoint (the signing secret is shown once)")
    hook.add_argument("url")
    hook.add_argument("--event", action="append", default=None, help="an event type (repeatable; default all)")
    hook.add_argument("--description", default=None)
    leaf(webhooks, "list", _webhooks_list, "list endpoints")
    for name, handler, text in (("show", _webhooks_show, "show"), ("delete", _webhooks_delete, "delete")):
        leaf(webhooks, name, handler, text).add_argument("id")
    update = leaf(webhooks, "update", _webhooks_update, "change, enable or disable an endpoint")
    update.add_argument("id")
    update.add_argument("--url", default=None)
    update.add_argument("--event", action="append", default=None)
    update.add_argument("--description", default=None)
    update.add_argument("--state", choices=["enable", "disable"], default=None)
    deliveries = leaf(webhooks, "deliveries", _webhooks_deliveries, "an endpoint's deliveries, newest first")
    deliveries.add_argument("id")
    deliveries.add_argument("--limit", type=int, default=20)
    redeliver = leaf(webhooks, "redeliver", _webhooks_redeliver, "send a delivery again")
    redeliver.add_argument("id")
    redeliver.add_argument("delivery_id")

    models = group("models", "supported models")
    leaf(models, "list", _models_list, "families and built-in tiny models")
    build = models.add_parser(
        "build", help="build a built-in model (dama/...) into a folder here, to load a downloaded adapter on"
    )
    build.add_argument("name", help="a built-in model, e.g. dama/tiny-llava")
    build.add_argument("--output", required=True, help="the folder to build it in")
    build.set_defaults(local_module=LOCAL_BUILD_MODULE)  # runs here, with the engine installed: not a client call
    chat = commands.add_parser(
        "chat", help="ask a base or tuned model (job_...) about images; streams the answer", parents=[common]
    )
    chat.add_argument("prompt", help="the question or instruction")
    chat.add_argument("--model", required=True, help="a base (dama/tiny-llava), job_... or job_...:STEP")
    chat.add_argument("--image", action="append", default=[], help="an image file or http(s) URL (repeatable)")
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None, help="0: greedy (default 1, OpenAI's)")
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(client_handler=_chat)
    chat_models = commands.add_parser("chat-models", help="the models you may chat with", parents=[common])
    chat_models.set_defaults(client_handler=_chat_models)
    usage = commands.add_parser("usage", help="chat requests and tokens by day and model", parents=[common])
    usage.add_argument("--start", default=None, help="first UTC day, YYYY-MM-DD (default 30 days ago)")
    usage.add_argument("--end", default=None, help="last UTC day (default today)")
    usage.set_defaults(client_handler=_usage)
    health = commands.add_parser(
        "health", help="is the service up (--ready: and its database and broker)?", parents=[common]
    )
    health.add_argument("--ready", action="store_true")
    health.set_defaults(client_handler=_health)


def run(args: argparse.Namespace) -> int:
    """Run a parsed client command; API errors exit 1 with the API's message (the error JSON with --json)."""
    handler: Handler = args.client_handler
    try:
        with Client(args.api_url, args.api_key, timeout=args.timeout) as client:
            return handler(client, args)
    except APIError as error:
        message = MISSING_KEY if error.code == "missing_api_key" else error.message
        detail = {"status": error.status_code, "type": error.type, "code": error.code, "message": message}
        if error.param:
            detail["param"] = error.param
        if args.json:
            print(json.dumps({"error": detail}), file=sys.stderr)
        else:
            where = f" (param: {error.param})" if error.param else ""
            print(f"error: {message} [{error.code}, HTTP {error.status_code}]{where}", file=sys.stderr)
        return 1
    except (DamaError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``dama`` with only the client commands (``python -m dama_client``)."""
    parser = argparse.ArgumentParser(prog="dama", description="DAMA alignment service client.")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    if hasattr(args, "local_module"):
        print("error: `dama models build` needs the engine: pip install -e '.[engine,service]'", file=sys.stderr)
        return 2
    return run(args)
