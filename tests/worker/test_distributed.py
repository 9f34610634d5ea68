"""Jobs on several GPUs: the torchrun command, the config file, following rank 0's files, and one real run with
two CPU processes (gloo) through ``run_job``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dama_engine.callbacks import Callback
from dama_engine.config import parse_config
from jobstore.spec import JobSpec
from tests.worker.conftest import JobStore, tiny_spec
from worker.distributed import MetricsTail, _Follower, torchrun_command, truncate_metrics, write_config
from worker.engine_config import build_train_config
from worker.tasks import run_job


def test_the_torchrun_command() -> None:
    command = torchrun_command(Path("/jobs/job_1/train_config.yaml"), nproc=4, python="/venv/bin/python")
    assert command == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "dama_engine.cli",
        "/jobs/job_1/train_config.yaml",
    ]
    assert torchrun_command(Path("c.yaml"), nproc=2)[0] == sys.executable
    with pytest.raises(ValueError):
        torchrun_command(Path("c.yaml"), nproc=0)


def test_the_config_file_reads_back_as_the_same_config(store: JobStore, tmp_path: Path) -> None:
    spec = JobSpec.model_validate({**tiny_spec(store.dataset(48)), "gpus": 2, "evaluation": {"holdout_fraction": 0.1}})
    config = build_train_config(spec, job_id="job_x", store=store.artifacts, settings=store.settings)
    path = write_config(config, tmp_path / "job" / "train_config.yaml")
    assert parse_config(yaml.safe_load(path.read_text())) == config


def test_the_metrics_tail_reads_complete_lines_and_survives_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert tail.read() == [{"step": 1, "loss": 0.5}]
    with path.open("a") as handle:
        handle.write('ss": 0.4}\n')
    assert tail.read() == [{"step": 2, "loss": 0.4}]
    path.write_text('{"step": 1, "loss": 0.5}\n')  # rewritten shorter (a resume truncates it)
    assert tail.read() == [{"step": 1, "loss": 0.5}]
    truncate_metrics(path, 0)
    assert path.read_text() == ""


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.calls.append(("stage", stage))

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.calls.append(("step", (step, total_steps)))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("eval", step))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.calls.append(("checkpoint", step))

    def on_activity(self) -> None:
        self.calls.append(("activity", None))


def test_rank_zero_files_become_callback_calls_in_stage_order(store: JobStore, tmp_path: Path) -> None:
    spec = JobSpec.model_validate({**tiny_spec(store.dataset(48), max_steps=None, epochs=2), "gpus": 2})
    config = build_train_config(spec, job_id="job_follow", store=store.artifacts, settings=store.settings)
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": str(tmp_path / "run")})})
    run, log = tmp_path / "run", tmp_path / "train.log"
    run.mkdir()
    recorder = Recorder()
    follower = _Follower(config, recorder, log, resume_step=0)
    # Both ranks print their stages; rank 0 alone writes metrics and checkpoints.
    log.write_text(
        "[dama] validating\n[dama] validating\n[dama] loading_model (model=/m)\n[dama] scoring (pairs=48)\n"
        "[dama] reference (pairs=48)\n[dama] evaluating (when=before, pairs=8)\ntraining:  10%|# | 1/12\r"
        "[dama] evaluating (when=after, pairs=8)\n[dama] exporting\n"
    )
    lines = [{"step": 0, "eval_loss": 0.7}, *({"step": s, "loss": 0.6, "epoch": s / 6} for s in (1, 2))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "state.json").write_text('{"step": 2}')
    follower.poll()
    assert recorder.calls == [
        ("activity", None),  # rank 0's log grew: the stall watchdog counts it
        ("stage", "validating"),
        ("stage", "loading_model"),
        ("stage", "scoring"),
        ("stage", "reference"),
        ("stage", "evaluating"),
        ("eval", 0),
        ("stage", "training"),
        ("step", (1, 12)),  # 6 steps per epoch (from the epoch field) x 2 epochs
        ("step", (2, 12)),
        ("checkpoint", 2),
        ("stage", "evaluating"),
        ("stage", "exporting"),
    ]
    follower.poll()
    assert len(recorder.calls) == 13  # nothing is reported twice
    with log.open("a") as handle:
        handle.write("training:  20%|## | 2/12\r")  # a progress bar moving, nothing else
    follower.poll()
    assert recorder.calls[13:] == [("activity", None)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_two_process_job_runs_under_torchrun(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # two CPU ranks (gloo), also on a GPU host
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # No held-out split, to keep it short (rank-0 evaluation under DDP is covered in
    # tests/engine/test_distributed_training.py).
    spec = {**tiny_spec(store.dataset(48), max_steps=6, checkpoint_every=3, batch_size=2), "gpus": 2}
    job_id = store.create_job(spec, queue="in-process")
    settings = store.settings.model_copy(update={"metrics_flush_s": 0.1})
    status = run_job(job_id, session_factory=store.factory, settings=settings, worker="pytest:ddp")
    job = store.job(job_id)
    log = (store.artifacts.job_dir(job_id) / "train.log").read_text()[-4000:]
    assert status == "succeeded", (job.error_message, log)
    assert job.step == 6 and job.total_steps == 6
    stages = store.stages(job_id)
    assert stages == ["validating", "loading_model", "scoring", "reference", "training", "exporting"], stages
    assert store.checkpoint_steps(job_id) == [3]
    assert [int(step) for step, _ in store.metric_series(job_id)["loss"]] == list(range(1, 7))
    assert job.result is not None and job.result["steps"] == 6 and "loss" in job.result["train_metrics"]
    assert store.artifacts.adapter_archive(job_id).is_file()
