"""A job on several GPUs: the engine under ``torchrun`` (DDP, or FSDP2 with the spec's ``strategy: fsdp``),
followed from the outside.

The engine's own launcher support is the distributed runtime (``torchrun --nproc_per_node N -m dama_engine.cli
CONFIG.yaml``; each rank takes its slice of every batch and rank 0 writes metrics and the adapter; under ``fsdp``
every rank also writes its checkpoint shard; the config file carries ``distributed.strategy``),
so the worker only writes the config file, starts the launcher in a process group of its own, and follows the
progress events rank 0 appends to ``events.jsonl`` (``dama-train --events``; schema in :mod:`dama_engine.events`):
each record becomes the same callback call an in-process run makes, which goes through the same records
(:class:`dama_engine.events.EventRelay`). The run log is for people: nothing reads it but the liveness check (it
grew) and the tail quoted when the launcher fails.

Stopping (cancel, shutdown, a lost run) ends the launcher's process group (SIGTERM, then SIGKILL); the launcher
passes SIGTERM to its ranks. The launcher also gets SIGTERM if the worker itself dies (Linux ``PDEATHSIG``), so a
killed worker leaves no orphaned training behind to race the run the sweeper starts again.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import JsonValue

import dama_engine
from dama_engine.callbacks import Callback
from dama_engine.config import TrainConfig
from dama_engine.data import DataError
from dama_engine.events import ErrorEvent, EvaluationEvent, Event, StageEvent, StepEvent, decode, deliver
from dama_engine.training import TrainResult, checkpoint_step, latest_checkpoint, truncate_metrics

USER_ERROR_EXIT = 2  # dama-train's exit code for a bad config or bad data
TERMINATE_GRACE_S = 30.0


class LauncherError(RuntimeError):
    """The launcher or one of its ranks failed for a reason that is not the job's input."""


def torchrun_command(config_file: Path, events_file: Path, *, nproc: int, python: str = sys.executable) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m dama_engine.cli CONFIG --events EVENTS`` with this
    interpreter (same venv).

    ``--standalone`` runs the rendezvous on a free local port, so several jobs on one machine never collide."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dama_engine.cli",
        str(config_file),
        "--events",
        str(events_file),
    ]


def write_config(config: TrainConfig, path: Path) -> Path:
    """The engine config as the YAML file the CLI reads (``TrainConfig.model_dump()``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    partial.replace(path)
    return path


def launcher_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # The ranks must import the same dama_engine as this worker, installed or not.
    source_root = str(Path(dama_engine.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class JsonlTail:
    """The complete lines appended to a JSONL file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def skip_existing(self) -> None:
        self.offset = self.path.stat().st_size if self.path.is_file() else 0

    def read(self) -> list[bytes]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:
            self.offset = 0  # rewritten from the start
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return [line for line in chunk[: end + 1].split(b"\n") if line.strip()]


def _count(value: JsonValue) -> int:
    return value if isinstance(value, int) else 0


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the launcher when the worker dies (resolved before the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec


class _Follower:
    """Turns rank 0's event records into callback calls, and keeps what the result needs."""

    def __init__(self, config: TrainConfig, callback: Callback, log_file: Path, events_file: Path) -> None:
        self.config = config
        self.callback = callback
        self.output_dir = Path(config.run.output_dir)
        self.log_file = log_file
        self.log_offset = log_file.stat().st_size if log_file.is_file() else 0
        self.log_start = self.log_offset
        self.events = JsonlTail(events_file)
        self.step = 0
        self.total_steps: int | None = config.optim.max_steps
        self.when: JsonValue = None  # the `when` of the last stage (evaluating: before, after, base_vs_tuned)
        self.train_metrics: dict[str, float] = {}
        self.eval_before: dict[str, float] | None = None
        self.eval_after: dict[str, float] | None = None
        self.error: ErrorEvent | None = None

    def _log_grew(self) -> bool:
        size = self.log_file.stat().st_size if self.log_file.is_file() else 0
        grew, self.log_offset = size > self.log_offset, size
        return grew

    def poll(self) -> None:
        if self._log_grew():
            # Rank 0's log grew (progress bars included): the ranks are alive, whatever the stage.
            self.callback.on_activity()
        for line in self.events.read():
            event = decode(line)
            self._note(event)
            deliver(event, self.callback)

    def _note(self, event: Event) -> None:
        if isinstance(event, StageEvent):
            self.when = event.info.get("when")
            if event.stage == "training":
                self.total_steps = _count(event.info.get("steps"))
                self.step = _count(event.info.get("resumed_from_step"))
        elif isinstance(event, StepEvent):
            self.step, self.total_steps, self.train_metrics = event.step, event.total_steps, dict(event.metrics)
        elif isinstance(event, EvaluationEvent):
            if self.when == "before":
                self.eval_before = dict(event.metrics)
            elif self.when == "after":
                self.eval_after = dict(event.metrics)
        elif isinstance(event, ErrorEvent):
            self.error = event

    def logged_eval_before(self) -> dict[str, float] | None:
        """The held-out evaluation before training: this attempt's, or the first attempt's (a resumed run does not
        evaluate again; ``metrics.jsonl`` keeps it at step 0)."""
        if self.eval_before is not None:
            return self.eval_before
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return None
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("step") == 0 and "eval_loss" in record:
                return {key: value for key, value in record.items() if key != "step"}
        return None

    def log_since_start(self) -> str:
        with self.log_file.open("rb") as handle:
            handle.seek(self.log_start)
            return handle.read().decode(errors="replace")


def run_distributed(
    config: TrainConfig,
    callback: Callback,
    *,
    nproc: int,
    work_dir: Path,
    poll_interval_s: float = 0.5,
    env: dict[str, str] | None = None,
) -> TrainResult:
    """Run ``config`` under torchrun with ``nproc`` processes and report through ``callback``, like ``train``.

    Raises :class:`~dama_engine.training.recipe.DataError` for a bad config or bad data (exit code 2, the CLI's message)
    and :class:`LauncherError` for anything else."""
    started = time.monotonic()
    output_dir = Path(config.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(output_dir) if config.run.resume else None
    truncate_metrics(output_dir / "metrics.jsonl", checkpoint_step(checkpoint) if checkpoint else 0)
    config_file = write_config(config, work_dir / "train_config.yaml")
    log_file = work_dir / "train.log"
    events_file = work_dir / "events.jsonl"
    events_file.unlink(missing_ok=True)  # this attempt's records only
    follower = _Follower(config, callback, log_file, events_file)
    command = torchrun_command(config_file, events_file, nproc=nproc)
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command,
            env=launcher_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops every rank
            preexec_fn=_die_with_parent(),  # only a prctl call, resolved before the fork
        )
    stopped = False
    try:
        while process.poll() is None:
            follower.poll()
            if callback.should_stop():
                stopped = True
                _terminate(process)
                break
            time.sleep(poll_interval_s)
        follower.poll()
    finally:
        if process.poll() is None:
            _terminate(process)
    result = TrainResult(
        output_dir=output_dir,
        adapter_dir=None,
        steps=follower.step,
        total_steps=follower.total_steps or follower.step,
        stopped=stopped,
        train_metrics=follower.train_metrics,
        eval_before=follower.logged_eval_before(),
        eval_after=follower.eval_after,
    )
    if not stopped:
        code = process.returncode
        if code == USER_ERROR_EXIT and follower.error is not None:
            raise DataError(follower.error.message, [dict(item) for item in follower.error.errors])
        if code != 0:
            tail = follower.log_since_start()[-4000:]
            raise LauncherError(f"torchrun exited with code {code}; the end of {log_file}:\n{tail}")
        adapter = output_dir / "adapter"
        if not (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file():
            raise LauncherError(f"torchrun finished but wrote no adapter into {adapter}")
        result.adapter_dir = adapter
    result.seconds = time.monotonic() - started
    return result


def _terminate(process: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
