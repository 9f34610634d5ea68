"""``distributed.strategy: fsdp`` (FSDP2) trains as DDP and as one process does, and resumes exactly from its
sharded checkpoints: 2 CPU ranks under ``torchrun`` (gloo), the demo's tiny LLaVA, LoRA and full fine-tuning.

One launch runs every two-rank run in turn (``distributed_runs.py``: the imports are paid once): LoRA and full
fine-tuning under ``ddp`` and under ``fsdp`` (per-device batch B), then each ``fsdp`` run again from its step-2
sharded checkpoint, copied as a run killed right after it leaves it. The one-process runs (batch 2B) train in
this process. With ``keep_ratio`` 1 and no dropout the three strategies see the same global batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dama_engine.config import TrainConfig, apply_overrides, load_config, parse_config
from dama_engine.proving.demo import prepare_demo
from dama_engine.training import checkpoint_dir, train
from tests.engine.torchrun import REPO, run_or_fail, torchrun

pytestmark = pytest.mark.slow

PER_DEVICE = 4
WORLD_SIZE = 2
MAX_STEPS = 4
CHECKPOINT_AT = 2
TIMEOUT_S = 400
# float32 on one machine: the ranks' sums and the one-process sums differ in rounding only.
LOSS_RTOL = 1e-5
# As in test_distributed_training: Adam can amplify rounding in elements whose gradient is near zero; a tenth of
# one LoRA step (learning rate 1e-2).
WEIGHT_ATOL = 1e-3
OVERRIDES = [
    "evaluation.enabled=false",
    f"optim.max_steps={MAX_STEPS}",
    "optim.seed=3",
    "optim.warmup_ratio=0",  # the first step already moves the weights: every later loss is compared
    "lora.dropout=0",
    "objective.method=dama",
    "objective.keep_ratio=1.0",
    f"run.checkpoint_every={CHECKPOINT_AT}",
]
KINDS = {
    # LoRA keeps a held-out split: evaluations before, during and after training run on both ranks in step.
    "lora": [f"run.eval_every={CHECKPOINT_AT}"],
    # A full fine-tune of the language model and projector (vision tower frozen), at a full fine-tune's step size.
    "full": ["lora.enabled=false", "optim.learning_rate=1e-3", "data.eval=", "run.eval_every="],
}


@dataclass
class Runs:
    root: Path

    def dir(self, kind: str, name: str) -> Path:
        return self.root / f"{kind}-{name}"


def _config(demo: TrainConfig, kind: str, output_dir: Path, *extra: str) -> TrainConfig:
    return parse_config(apply_overrides(demo.model_dump(), [*KINDS[kind], f"run.output_dir={output_dir}", *extra]))


def _launch(items: list[str], log: Path) -> None:
    run_or_fail([*torchrun(WORLD_SIZE), str(REPO / "tests" / "engine" / "distributed_runs.py"), *items], log, TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("fsdp")
    demo = prepare_demo(root / "demo", OVERRIDES, n_train=32, n_eval=8)
    found = Runs(root)
    items = []
    for kind in KINDS:
        for strategy in ("ddp", "fsdp"):
            config = _config(
                demo,
                kind,
                found.dir(kind, strategy),
                f"optim.batch_size={PER_DEVICE}",
                f"distributed.strategy={strategy}",
            )
            items.append(_write(config, root / f"{kind}-{strategy}.yaml"))
    for kind in KINDS:
        resumed = _config(
            demo, kind, found.dir(kind, "resumed"), f"optim.batch_size={PER_DEVICE}", "distributed.strategy=fsdp"
        )
        items += [
            f"copy:{found.dir(kind, 'fsdp')}:{CHECKPOINT_AT}:{found.dir(kind, 'resumed')}",
            _write(resumed, root / f"{kind}-resumed.yaml"),
        ]
    _launch(items, root / "torchrun.log")
    for kind in KINDS:  # one process over the same global batches
        train(_config(demo, kind, found.dir(kind, "one"), f"optim.batch_size={PER_DEVICE * WORLD_SIZE}"))
    return found


def _write(config: TrainConfig, path: Path) -> str:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path)


def _lines(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]


def _losses(output_dir: Path) -> list[float]:
    lines = [line for line in _lines(output_dir) if "loss" in line]
    assert [line["step"] for line in lines] == list(range(1, MAX_STEPS + 1))
    return [line["loss"] for line in lines]


def _weights(output_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    return load_file(output_dir / "adapter" / name)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp_losses_equal_ddp_and_one_process(runs: Runs, kind: str) -> None:
    fsdp, ddp, one = (_losses(runs.dir(kind, name)) for name in ("fsdp", "ddp", "one"))
    print(f"{kind} per-step losses: fsdp {fsdp}, ddp {ddp}, one process {one}")
    assert fsdp == pytest.approx(ddp, rel=LOSS_RTOL)
    assert fsdp == pytest.approx(one, rel=LOSS_RTOL)
    assert len(set(fsdp)) > 1  # training moved the loss: the comparison is not of constants


@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp_final_weights_equal_ddp_and_one_process(runs: Runs, kind: str) -> None:
    fsdp, ddp, one = (_weights(runs.dir(kind, name), kind) for name in ("fsdp", "ddp", "one"))
    assert fsdp.keys() == ddp.keys() == one.keys()
    for name, weight in fsdp.items():
        torch.testing.assert_close(weight, ddp[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(weight, one[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    if kind == "lora":  # training moved the adapter well past the tolerance (lora_B starts at zero)
        assert max(float(w.abs().max()) for n, w in fsdp.items() if "lora_B" in n) > 10 * WEIGHT_ATOL


def test_fsdp_held_out_evaluations_run_in_step_and_match_ddp(runs: Runs) -> None:
    def evaluations(name: str) -> list[tuple[int, float]]:
        return [(line["step"], line["eval_loss"]) for line in _lines(runs.dir("lora", name)) if "eval_loss" in line]

    fsdp, ddp = evaluations("fsdp"), evaluations("ddp")
    assert [step for step, _ in fsdp] == [0, CHECKPOINT_AT, MAX_STEPS]  # before, during, after; written once
    assert [loss for _, loss in fsdp] == pytest.approx([loss for _, loss in ddp], rel=LOSS_RTOL)


def test_a_sharded_lora_checkpoint_keeps_a_gathered_peft_adapter(runs: Runs) -> None:
    fsdp, ddp = (checkpoint_dir(runs.dir("lora", name), CHECKPOINT_AT) for name in ("fsdp", "ddp"))
    assert sorted(p.name for p in (fsdp / "sharded").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not (fsdp / "trainable.safetensors").exists() and not (fsdp / "optimizer.pt").exists()
    sharded = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    whole = load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert sharded.keys() == whole.keys()
    for name, weight in sharded.items():  # whole tensors, not one rank's shard
        assert weight.shape == whole[name].shape, name
        torch.testing.assert_close(weight, whole[name], rtol=0, atol=1e-6, msg=name)
    config = json.loads((fsdp / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_a_full_fine_tune_keeps_one_sharded_checkpoint_and_no_adapter(runs: Runs) -> None:
    checkpoint = checkpoint_dir(runs.dir("full", "fsdp"), CHECKPOINT_AT)
    assert (checkpoint / "sharded").is_dir() and not (checkpoint / "adapter").exists()
    config = load_config(runs.root / "full-fsdp.yaml")
    assert config.run.keep_checkpoints is None and config.checkpoints_kept == 1  # unset: one for a full fine-tune


@pytest.mark.parametrize("kind", list(KINDS))
def test_resuming_from_a_sharded_checkpoint_gives_the_uninterrupted_run(runs: Runs, kind: str) -> None:
    uninterrupted, resumed = runs.dir(kind, "fsdp"), runs.dir(kind, "resumed")
    assert _losses(resumed) == _losses(uninterrupted)  # steps 1-2 kept from the log, 3-4 trained after resuming
    after = [line for line in _lines(resumed) if "loss" in line and line["step"] > CHECKPOINT_AT]
    assert [line["grad_norm"] for line in after] == [
        line["grad_norm"] for line in _lines(uninterrupted) if "loss" in line and line["step"] > CHECKPOINT_AT
    ]
    a, b = _weights(uninterrupted, kind), _weights(resumed, kind)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
