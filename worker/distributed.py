"""A job on several GPUs: the engine under ``torchrun`` (DDP), followed from the outside.

The engine's own launcher support is the distributed runtime (``torchrun --nproc_per_node N -m dama_engine.cli
CONFIG.yaml``; each rank takes its slice of every batch and rank 0 writes checkpoints, metrics and the adapter),
so the worker only writes the config file, starts the launcher in a process group of its own, and turns what
rank 0 writes into the same callback calls an in-process run makes:

* stages from the CLI's ``[dama] <stage> (...)`` lines in the run log,
* steps and evaluations from new lines of ``run/metrics.jsonl``,
* checkpoints from new complete ``run/checkpoints/step-*`` folders.

Stopping (cancel, shutdown, a lost run) ends the launcher's process group (SIGTERM, then SIGKILL); the launcher
passes SIGTERM to its ranks. The launcher also gets SIGTERM if the worker itself dies (Linux ``PDEATHSIG``), so a
killed worker leaves no orphaned training behind to race the run the sweeper starts again.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

import dama_engine
from dama_engine.callbacks import STAGES, Callback
from dama_engine.checkpoint import latest_checkpoint
from dama_engine.config import TrainConfig
from dama_engine.trainer import DataError, TrainResult

_STAGE_LINE = re.compile(r"^\[dama\] (?P<stage>[a-z_]+)(?: \((?P<info>.*)\))?\s*$")
_PRE_TRAINING = ("validating", "loading_model", "scoring", "reference")
USER_ERROR_EXIT = 2  # dama-train's exit code for a bad config or bad data
TERMINATE_GRACE_S = 30.0


class LauncherError(RuntimeError):
    """The launcher or one of its ranks failed for a reason that is not the job's input."""


def torchrun_command(config_file: Path, *, nproc: int, python: str = sys.executable) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m dama_engine.cli CONFIG`` with this interpreter (same venv).

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


class MetricsTail:
    """The complete lines appended to a JSONL file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def skip_existing(self) -> None:
        self.offset = self.path.stat().st_size if self.path.is_file() else 0

    def read(self) -> list[dict[str, Any]]:
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
        return [json.loads(line) for line in chunk[: end + 1].splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past ``step`` (what a resumed run logs again), as the engine does when it resumes."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _stage_info(raw: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for part in (raw or "").split(", "):
        key, sep, value = part.partition("=")
        if sep:
            info[key] = int(value) if value.isdigit() else value
    return info


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
    """Turns rank 0's files into callback calls."""

    def __init__(self, config: TrainConfig, callback: Callback, log_file: Path, resume_step: int) -> None:
        self.config = config
        self.callback = callback
        self.output_dir = Path(config.run.output_dir)
        self.log_file = log_file
        self.log_offset = log_file.stat().st_size if log_file.is_file() else 0
        self.log_start = self.log_offset
        self.metrics = MetricsTail(self.output_dir / "metrics.jsonl")
        self.metrics.skip_existing()
        self.resume_step = resume_step
        self.step = resume_step
        self.total_steps: int | None = config.optim.max_steps
        self.training_started = False
        self.stages_seen: set[tuple[str, Any]] = set()
        self.train_metrics: dict[str, float] = {}
        self.eval_after: dict[str, float] | None = None
        self.seen_checkpoints = self._checkpoints()

    def _checkpoints(self) -> set[Path]:
        root = self.output_dir / "checkpoints"
        if not root.is_dir():
            return set()
        return {path for path in root.glob("step-*") if (path / "state.json").is_file()}

    def _stage_lines(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.log_file.is_file():
            return []
        with self.log_file.open("rb") as handle:
            handle.seek(self.log_offset)
            chunk = handle.read()
        if chunk:
            # Rank 0's log grew (progress bars included): the ranks are alive, whatever the stage.
            self.callback.on_activity()
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            return []
        self.log_offset += end + 1
        stages = []
        for line in re.split(r"[\r\n]", chunk[: end + 1].decode(errors="replace")):
            match = _STAGE_LINE.match(line.strip())
            if match and match["stage"] in STAGES:
                info = _stage_info(match["info"])
                key = (match["stage"], info.get("when"))
                if key not in self.stages_seen:  # every rank prints its stages; report each once
                    self.stages_seen.add(key)
                    stages.append((match["stage"], info))
        return stages

    def _start_training(self) -> None:
        if not self.training_started:
            self.training_started = True
            self.callback.on_stage("training", {"steps": self.total_steps or 0, "resumed_from_step": self.resume_step})

    def poll(self) -> None:
        stages = self._stage_lines()
        early = [(stage, info) for stage, info in stages if stage in _PRE_TRAINING or info.get("when") == "before"]
        late = [item for item in stages if item not in early]
        for stage, info in early:
            self.callback.on_stage(stage, info)
        for record in self.metrics.read():
            step = int(record.pop("step"))
            if "loss" in record:
                self._on_train_line(step, record)
            elif any(key.startswith("eval_") for key in record):
                if step > 0 and step >= self.step and self.training_started and self._at_end(step):
                    self.eval_after = record
                self.callback.on_eval(step, record)
        for path in sorted(self._checkpoints() - self.seen_checkpoints):
            self.seen_checkpoints.add(path)
            self.callback.on_checkpoint(int(json.loads((path / "state.json").read_text())["step"]), path)
        for stage, info in late:
            self.callback.on_stage(stage, info)

    def _on_train_line(self, step: int, record: dict[str, Any]) -> None:
        if self.total_steps is None and record.get("epoch"):
            # steps per epoch = step / epoch; the run lasts optim.epochs of them.
            self.total_steps = round(self.config.optim.epochs * step / float(record["epoch"]))
        self._start_training()
        self.step = step
        self.train_metrics = {key: float(value) for key, value in record.items()}
        self.callback.on_step(step, self.total_steps or step, self.train_metrics)

    def _at_end(self, step: int) -> bool:
        return self.total_steps is not None and step >= self.total_steps

    def eval_before(self) -> dict[str, float] | None:
        if not self.metrics.path.is_file():
            return None
        for line in self.metrics.path.read_text().splitlines():
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

    Raises :class:`~dama_engine.trainer.DataError` for a bad config or bad data (exit code 2, the CLI's message)
    and :class:`LauncherError` for anything else."""
    started = time.monotonic()
    output_dir = Path(config.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(output_dir) if config.run.resume else None
    resume_step = int(json.loads((checkpoint / "state.json").read_text())["step"]) if checkpoint else 0
    truncate_metrics(output_dir / "metrics.jsonl", resume_step if checkpoint else -1)
    config_file = write_config(config, work_dir / "train_config.yaml")
    log_file = work_dir / "train.log"
    follower = _Follower(config, callback, log_file, resume_step)
    command = torchrun_command(config_file, nproc=nproc)
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
        eval_before=follower.eval_before(),
        eval_after=follower.eval_after,
    )
    if not stopped:
        code = process.returncode
        if code == USER_ERROR_EXIT:
            text = follower.log_since_start()
            position = text.rfind("dama-train: ")
            message = text[position + len("dama-train: ") :] if position >= 0 else text[-4000:]
            raise DataError(message.strip())
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
