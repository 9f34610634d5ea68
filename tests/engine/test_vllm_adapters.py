"""Which jobs' adapters vLLM can load (``JobSpec.vllm_loadable``), checked against the adapters the engine writes.

vLLM's multi-LoRA refuses an adapter whose ``adapter_config.json`` has ``modules_to_save`` (weights saved in full
beside the LoRA pairs: vllm-project/vllm#9280, hiyouga/LLaMA-Factory#9545). The API routes a job to vLLM only
when ``vllm_loadable`` says so; this test makes the adapter of each kind of LoRA job a tenant can ask for (the
same ``make_trainable`` the training run uses) and reads what peft saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dama_engine.config import LoraSection, ModelSection
from dama_engine.models.loading import load_model, make_trainable
from jobstore.spec import JobSpec


@pytest.mark.parametrize(
    "lora",
    [{}, {"train_projector": True}, {"r": 4, "alpha": 8}, {"target_modules": ["q_proj", "v_proj"]}],
    ids=["default", "train_projector", "small_rank", "named_targets"],
)
def test_vllm_loadable_matches_the_saved_adapter(
    lora: dict[str, object], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    spec = JobSpec.model_validate({"model": "dama/tiny-llava", "dataset_id": "ds_x", "lora": lora})
    model = load_model(ModelSection(name_or_path=str(tiny_models["llava"])), dtype=torch.float32)
    section = LoraSection(**spec.lora.model_dump())
    make_trainable(model, section).save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert bool(saved.get("modules_to_save")) is not spec.vllm_loadable, saved.get("modules_to_save")


def test_a_full_fine_tune_is_not_a_lora_adapter() -> None:
    spec = JobSpec.model_validate({"model": "dama/tiny-llava", "dataset_id": "ds_x", "lora": {"enabled": False}})
    assert not spec.vllm_loadable
