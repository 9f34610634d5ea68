"""Exact resume: a run stopped at a checkpoint and resumed ends bit for bit where an uninterrupted run ends.

Both runs train the demo's tiny LLaVA with LoRA dropout on (the torch RNG matters) and DAMA filtering at
keep_ratio 0.5 (the filtering generator matters), so any state a checkpoint forgets (weights, optimizer moments,
scheduler position, RNG streams, the running R_bar, the data position) shows up as a difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dama_engine.callbacks import Callback
from dama_engine.config import TrainConfig
from dama_engine.proving.demo import prepare_demo
from dama_engine.training.checkpoint import ADAPTER_DIR, checkpoint_dir, latest_checkpoint
from dama_engine.training.recipe import TrainResult, train
from jobstore.artifacts import CHECKPOINT_ADAPTER_DIR

pytestmark = pytest.mark.slow

STOP_AT = 3
OFF_SCHEDULE_STOP = 2
MAX_STEPS = 6
OVERRIDES = [
    "optim.batch_size=8",
    f"optim.max_steps={MAX_STEPS}",
    "run.checkpoint_every=3",
    "run.eval_every=",
    "lora.dropout=0.1",
    "objective.method=dama",
    "objective.keep_ratio=0.5",
    "evaluation.enabled=false",  # base-vs-tuned generation is not what these tests are about
]


class StopAfter(Callback):
    """Asks the run to stop once step ``stop_at`` has finished; records what the trainer reported."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.steps: list[int] = []
        self.checkpoints: list[int] = []
        self.training_info: dict[str, Any] = {}

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "training":
            self.training_info = dict(info)

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.steps.append(step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append(step)

    def should_stop(self) -> bool:
        return self.stop_at is not None and bool(self.steps) and self.steps[-1] >= self.stop_at


@dataclass
class Runs:
    a: TrainResult
    b_stopped: TrainResult
    b_resumed: TrainResult
    b_first: StopAfter
    b_second: StopAfter
    checkpoint_after_stop: Path | None
    c_stopped: TrainResult  # stopped at step 2, between two scheduled checkpoints
    c_resumed: TrainResult
    base_model: str


def _metrics(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]


def _train_lines(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step training lines (evaluation lines carry ``eval_*`` keys instead of ``loss``)."""
    return [line for line in _metrics(output_dir) if "loss" in line]


def _adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module", params=[1, 2], ids=["accumulation1", "accumulation2"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp(f"resume-{request.param}")
    overrides = [*OVERRIDES, f"optim.grad_accumulation={request.param}"]
    # One model and one dataset for every run; only the output folder differs.
    prepare_demo(root / "demo", overrides, n_train=64, n_eval=16)

    def config(name: str) -> TrainConfig:
        return prepare_demo(root / "demo", [*overrides, f"run.output_dir={root / name}"], n_train=64, n_eval=16)

    a = train(config("a"))
    first, second = StopAfter(STOP_AT), StopAfter()
    b_config = config("b")
    assert b_config.run.resume
    b_stopped = train(b_config, first)
    checkpoint_after_stop = latest_checkpoint(root / "b")
    b_resumed = train(b_config, second)
    c_config = config("c")
    c_stopped = train(c_config, StopAfter(OFF_SCHEDULE_STOP))
    c_resumed = train(c_config)
    base_model = b_config.model.name_or_path
    return Runs(a, b_stopped, b_resumed, first, second, checkpoint_after_stop, c_stopped, c_resumed, base_model)


def test_stop_writes_a_checkpoint_and_returns_stopped(runs: Runs) -> None:
    stopped = runs.b_stopped
    assert stopped.stopped
    assert stopped.steps == STOP_AT
    assert stopped.adapter_dir is None
    assert runs.b_first.steps == [1, 2, 3]
    assert runs.b_first.checkpoints == [STOP_AT]
    assert runs.checkpoint_after_stop == checkpoint_dir(stopped.output_dir, STOP_AT)
    assert json.loads((runs.checkpoint_after_stop / "state.json").read_text())["step"] == STOP_AT


def test_resume_continues_from_the_checkpoint(runs: Runs) -> None:
    resumed = runs.b_resumed
    assert not resumed.stopped
    assert resumed.steps == resumed.total_steps == MAX_STEPS
    assert runs.b_second.training_info["resumed_from_step"] == STOP_AT
    assert runs.b_second.steps == [4, 5, 6]  # steps 1-3 are not trained again
    # The held-out numbers from before training come back from the log, so the model card still has them.
    assert resumed.eval_before == runs.a.eval_before and resumed.eval_before is not None


def test_resumed_adapter_is_bit_identical(runs: Runs) -> None:
    uninterrupted, resumed = _adapter(runs.a.output_dir), _adapter(runs.b_resumed.output_dir)
    assert uninterrupted.keys() == resumed.keys()
    assert any("lora_A" in name for name in uninterrupted)
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name


def test_metrics_log_each_step_once_and_match(runs: Runs) -> None:
    a_lines, b_lines = _train_lines(runs.a.output_dir), _train_lines(runs.b_resumed.output_dir)
    assert [line["step"] for line in b_lines] == list(range(1, MAX_STEPS + 1))
    assert [line["step"] for line in a_lines] == list(range(1, MAX_STEPS + 1))
    # The running R_bar is restored from the checkpoint: the last step's value is the same exactly.
    assert b_lines[-1]["reward_gap_mean"] == a_lines[-1]["reward_gap_mean"]
    assert b_lines[-1]["reward_gap_mean"] != 0.0
    assert runs.b_resumed.train_metrics["reward_gap_mean"] == runs.a.train_metrics["reward_gap_mean"]
    # Every logged quantity (loss, kept count, betas, grad norm, ...) of every step matches.
    assert b_lines == a_lines
    # The held-out evaluation before training (step 0) survives the resume's truncation of metrics.jsonl.
    assert [line["step"] for line in _metrics(runs.b_resumed.output_dir) if "eval_loss" in line] == [0, MAX_STEPS]


def test_checkpoint_restores_optimizer_and_scheduler(runs: Runs) -> None:
    a_lines, b_lines = _train_lines(runs.a.output_dir), _train_lines(runs.b_resumed.output_dir)
    lrs = [line["lr"] for line in a_lines]
    # Warmup then cosine decay: a fresh scheduler would restart at lr 0 on the first resumed step.
    assert lrs[0] == 0.0 and len(set(lrs)) == len(lrs)
    for a_line, b_line in zip(a_lines[STOP_AT:], b_lines[STOP_AT:], strict=True):
        assert b_line["lr"] == a_line["lr"], a_line["step"]
        # Adam's moments and step count shape the first resumed update: the grad norms that follow match exactly.
        assert b_line["grad_norm"] == a_line["grad_norm"], a_line["step"]
    assert runs.checkpoint_after_stop is not None
    optimizer_state = torch.load(runs.checkpoint_after_stop / "optimizer.pt", weights_only=False)
    steps = {float(value["step"]) for value in optimizer_state["state"].values()}
    assert steps == {float(STOP_AT)}
    scheduler_state = torch.load(runs.checkpoint_after_stop / "scheduler.pt", weights_only=False)
    assert scheduler_state["last_epoch"] == STOP_AT


def test_stop_between_scheduled_checkpoints_still_resumes_exactly(runs: Runs) -> None:
    # run.checkpoint_every is 3; a stop after step 2 writes its own checkpoint so no step is lost.
    assert runs.c_stopped.stopped and runs.c_stopped.steps == OFF_SCHEDULE_STOP
    assert latest_checkpoint(runs.c_resumed.output_dir) == checkpoint_dir(runs.c_resumed.output_dir, STOP_AT)
    assert checkpoint_dir(runs.c_resumed.output_dir, OFF_SCHEDULE_STOP).is_dir()
    assert runs.c_resumed.steps == MAX_STEPS and not runs.c_resumed.stopped
    uninterrupted, resumed = _adapter(runs.a.output_dir), _adapter(runs.c_resumed.output_dir)
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    assert _train_lines(runs.c_resumed.output_dir) == _train_lines(runs.a.output_dir)


def test_checkpoint_holds_a_loadable_peft_adapter_of_its_weights(runs: Runs) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    assert runs.checkpoint_after_stop is not None
    assert ADAPTER_DIR == CHECKPOINT_ADAPTER_DIR  # the API serves this folder without importing the engine
    folder = runs.checkpoint_after_stop / ADAPTER_DIR
    trainable = load_file(runs.checkpoint_after_stop / "trainable.safetensors")
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(runs.base_model), folder)
    loaded = {name: tensor for name, tensor in model.named_parameters() if "lora_" in name}
    assert loaded and loaded.keys() <= trainable.keys()
    # The adapter is the step-3 training state, not the base's zero-initialised LoRA B.
    assert any(name.endswith("lora_B.default.weight") and trainable[name].abs().sum() > 0 for name in loaded)
    for name, tensor in loaded.items():
        assert torch.equal(tensor.detach(), trainable[name]), name
