"""Jobs on several GPUs: the torchrun command, the config file, following rank 0's event records, and one real
run with two CPU processes (gloo) through ``run_job``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dama_engine.callbacks import Callback
from dama_engine.config import parse_config
from dama_engine.events import EventLog, EventRelay
from dama_engine.training.metrics_log import truncate_metrics
from jobstore.spec import JobSpec
from tests.worker.conftest import JobStore, tiny_spec
from worker.distributed import JsonlTail, _Follower, torchrun_command, write_config
from worker.engine_config import build_train_config
from worker.tasks import run_job


def test_the_torchrun_command() -> None:
    command = torchrun_command(
        Path("/jobs/job_1/train_config.yaml"), Path("/jobs/job_1/events.jsonl"), nproc=4, python="/venv/bin/python"
    )
    assert command == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "dama_engine.cli",
        "/jobs/job_1/train_config.yaml",
        "--events",
        "/jobs/job_1/events.jsonl",
    ]
    assert torchrun_command(Path("c.yaml"), Path("e.jsonl"), nproc=2)[0] == sys.executable
    with pytest.raises(ValueError):
        torchrun_command(Path("c.yaml"), Path("e.jsonl"), nproc=0)


def test_the_config_file_reads_back_as_the_same_config(store: JobStore, tmp_path: Path) -> None:
    spec = JobSpec.model_validate({**tiny_spec(store.dataset(48)), "gpus": 2, "evaluation": {"holdout_fraction": 0.1}})
    config = build_train_config(spec, job_id="job_x", store=store.artifacts, settings=store.settings)
    path = write_config(config, tmp_path / "job" / "train_config.yaml")
    assert parse_config(yaml.safe_load(path.read_text())) == config


def test_the_jsonl_tail_reads_complete_lines_and_survives_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert tail.read() == [b'{"step": 1, "loss": 0.5}']
    with path.open("a") as handle:
        handle.write('ss": 0.4}\n')
    assert tail.read() == [b'{"step": 2, "loss": 0.4}']
    path.write_text('{"step": 1, "loss": 0.5}\n')  # rewritten shorter (a resume truncates it)
    assert tail.read() == [b'{"step": 1, "loss": 0.5}']
    path.write_text('{"step": 0, "eval_loss": 0.7}\n{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    truncate_metrics(path, 1)  # resumed from the checkpoint at step 1: step 2 is logged again
    assert path.read_text() == '{"step": 0, "eval_loss": 0.7}\n{"step": 1, "loss": 0.5}\n'
    truncate_metrics(path, 0)  # no checkpoint: everything is logged again, from the evaluation before training
    assert not path.exists() and tail.read() == []


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.calls.append(("stage", (stage, info)))

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.calls.append(("progress", (stage, done, total)))

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.calls.append(("step", (step, total_steps, metrics)))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("eval", (step, metrics)))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.calls.append(("checkpoint", (step, path)))

    def on_activity(self) -> None:
        self.calls.append(("activity", None))


# Values that broke the old `[dama] stage (k=v, ...)` line protocol: separators, quotes, newlines.
AWKWARD = 'org/model, v2 "final"\nrevision=main, when=after\\'


def _emit_a_run(callback: Callback, checkpoint: Path) -> None:
    """The calls a short run makes, in order, with awkward values where the protocol allows strings."""
    callback.on_stage("validating", {})
    callback.on_stage("loading_model", {"model": AWKWARD})
    callback.on_stage("scoring", {"pairs": 48})
    callback.on_progress("scoring", 16, 48)
    callback.on_stage("reference", {"pairs": 56})
    callback.on_stage("evaluating", {"when": "before", "pairs": 8})
    callback.on_eval(0, {"eval_loss": 0.7, "eval_accuracy": 0.5})
    callback.on_stage("training", {"steps": 12, "resumed_from_step": 0, "pairs": 48})
    callback.on_step(1, 12, {"loss": 0.6, "epoch": 1 / 6, "grad_norm": float("inf")})
    callback.on_step(2, 12, {"loss": 0.5, "epoch": 2 / 6, "grad_norm": 1.25})
    callback.on_checkpoint(2, checkpoint)
    callback.on_stage("evaluating", {"when": "after", "pairs": 8})
    callback.on_eval(12, {"eval_loss": 0.4, "eval_accuracy": 0.875})
    callback.on_progress("evaluating/log_probs", 3, 8)
    callback.on_stage("exporting", {})


def test_rank_zero_event_records_become_the_same_callback_calls(store: JobStore, tmp_path: Path) -> None:
    spec = JobSpec.model_validate({**tiny_spec(store.dataset(48), max_steps=None, epochs=2), "gpus": 2})
    config = build_train_config(spec, job_id="job_follow", store=store.artifacts, settings=store.settings)
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": str(tmp_path / "run")})})
    log, events = tmp_path / "train.log", tmp_path / "events.jsonl"
    checkpoint = tmp_path / "run" / f"checkpoints/step-000002 {AWKWARD}"
    direct = Recorder()
    _emit_a_run(direct, checkpoint)

    # Under torchrun: rank 0's EventLog writes the file, the worker's follower delivers it.
    followed = Recorder()
    follower = _Follower(config, followed, log, events)
    _emit_a_run(EventLog(events), checkpoint)
    log.write_text("[dama] validating (this text is for people and is never parsed)\n")
    follower.poll()
    assert followed.calls == [("activity", None), *direct.calls]
    assert follower.step == 2 and follower.total_steps == 12
    assert follower.eval_before == {"eval_loss": 0.7, "eval_accuracy": 0.5}
    assert follower.eval_after == {"eval_loss": 0.4, "eval_accuracy": 0.875}
    follower.poll()
    assert len(followed.calls) == len(direct.calls) + 1  # nothing is reported twice
    with log.open("a") as handle:
        handle.write("training:  20%|## | 2/12\r")  # a progress bar moving, nothing else
    follower.poll()
    assert followed.calls[-1] == ("activity", None)

    # In process: the relay turns each call into the same record and delivers it.
    relayed = Recorder()
    _emit_a_run(EventRelay(relayed), checkpoint)
    assert relayed.calls == direct.calls


def test_a_user_error_arrives_as_a_record(store: JobStore, tmp_path: Path) -> None:
    config = build_train_config(
        JobSpec.model_validate(tiny_spec(store.dataset(8))), job_id="j", store=store.artifacts, settings=store.settings
    )
    follower = _Follower(config, Recorder(), tmp_path / "train.log", tmp_path / "events.jsonl")
    errors = [{"row": 3, "field": "chosen", "reason": 'empty, "quoted"\nanswer'}]
    EventLog(tmp_path / "events.jsonl").error(f"data.train: 1 invalid rows\n{AWKWARD}", errors)
    follower.poll()
    assert follower.error is not None
    assert follower.error.message == f"data.train: 1 invalid rows\n{AWKWARD}"
    assert follower.error.errors == errors


def test_the_cli_records_a_bad_config_as_an_error_event(store: JobStore, tmp_path: Path) -> None:
    from dama_engine.cli.train import train_main

    config = build_train_config(
        JobSpec.model_validate(tiny_spec(store.dataset(8))), job_id="j", store=store.artifacts, settings=store.settings
    )
    events = tmp_path / "events.jsonl"
    follower = _Follower(config, Recorder(), tmp_path / "train.log", events)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\noptim: {learning_rate: -1}\n")
    assert train_main([str(bad), "--events", str(events)]) == 2
    follower.poll()
    assert follower.error is not None and "optim.learning_rate" in follower.error.message


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_process_job_runs_under_torchrun(store: JobStore, monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # two CPU ranks (gloo), also on a GPU host
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # No held-out split, to keep it short (evaluation under DDP and FSDP is covered in
    # tests/engine/test_distributed_training.py and tests/engine/test_fsdp.py).
    spec = {**tiny_spec(store.dataset(48), max_steps=6, checkpoint_every=3, batch_size=2), "gpus": 2}
    job_id = store.create_job({**spec, "strategy": strategy}, queue="in-process")
    settings = store.settings.model_copy(update={"metrics_flush_s": 0.1})
    status = run_job(job_id, session_factory=store.factory, settings=settings, worker=f"pytest:{strategy}")
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
