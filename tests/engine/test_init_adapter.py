"""Starting from an adapter (shared/DAMA.md section 4b): the run trains the given adapter further, its reference is
base + that adapter frozen (so the first step sees zero rewards), the reference cache tells the two starts apart,
and the result still loads on the plain base."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from dama_engine.proving.demo import prepare_demo
from dama_engine.training.checkpoint import ADAPTER_DIR, checkpoint_dir
from dama_engine.training.recipe import train

pytestmark = pytest.mark.slow

OVERRIDES = [
    "optim.batch_size=8",
    "optim.max_steps=3",
    "run.checkpoint_every=2",
    "run.eval_every=",
    "lora.dropout=0.0",
    "objective.method=dpo",
    "evaluation.enabled=false",
]


def _steps(output_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [line for line in lines if "loss" in line]


def test_a_run_continues_from_a_checkpoint_adapter(tmp_path: Path) -> None:
    prepare_demo(tmp_path / "demo", OVERRIDES, n_train=32, n_eval=8)
    cache = f"run.cache_dir={tmp_path / 'cache'}"  # one reference cache for both runs
    first = train(prepare_demo(tmp_path / "demo", [*OVERRIDES, cache, f"run.output_dir={tmp_path / 'a'}"]))
    start = checkpoint_dir(first.output_dir, 2) / ADAPTER_DIR
    assert (start / "adapter_config.json").is_file()
    # From the plain base, the adapter starts at zero: the first step's rewards are zero by construction.
    assert abs(_steps(first.output_dir)[0]["reward_margin"]) < 1e-6
    assert abs(_steps(first.output_dir)[2]["reward_margin"]) > 1e-4  # and it moved

    config = prepare_demo(
        tmp_path / "demo",
        [*OVERRIDES, cache, f"run.output_dir={tmp_path / 'b'}", f"model.init_adapter={start}"],
    )
    second = train(config)
    step_one = _steps(second.output_dir)[0]
    # The reference is base + the starting adapter: before its first update the policy equals it, so the first
    # step's rewards are zero and the DPO loss is log 2. (Against the plain base they would not be.)
    assert abs(step_one["rewards_chosen"]) < 1e-5 and abs(step_one["rewards_rejected"]) < 1e-5
    assert step_one["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # ... and that start is the checkpoint's weights: the same first batch scores differently than from the base
    # (a fresh adapter would reproduce the first run's step-1 log-probs exactly).
    from_base = _steps(first.output_dir)[0]
    assert abs(step_one["logps_policy_chosen"] - from_base["logps_policy_chosen"]) > 1e-3
    assert step_one["logps_ref_chosen"] == pytest.approx(step_one["logps_policy_chosen"], abs=1e-4)
    # Two reference entries in the shared cache: the starting adapter is part of the key.
    assert len(list((tmp_path / "cache").rglob("reference*"))) >= 2

    # The result applies to the plain base, and it is the starting adapter trained further (not a fresh one).
    assert second.adapter_dir is not None
    base = AutoModelForImageTextToText.from_pretrained(config.model.name_or_path)
    tuned = PeftModel.from_pretrained(base, second.adapter_dir)
    assert any("lora_B" in name for name, _ in tuned.named_parameters())
    started = load_file(start / "adapter_model.safetensors")
    ended = load_file(second.adapter_dir / "adapter_model.safetensors")
    assert started.keys() == ended.keys()
    assert all(not torch.equal(started[name], ended[name]) for name in started if "lora_B" in name)  # trained on
