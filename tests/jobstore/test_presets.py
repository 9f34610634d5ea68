"""Job spec presets (``dama_settings.presets``): the ``paper`` preset is the released recipe of shared/DAMA.md
section 6, fills what a request leaves out, lets the request's own values win, and reaches the engine config."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from jobstore.spec import EvaluationCreate, JobSpec
from worker.engine_config import StagedInputs, train_config

HUB_MODEL = "llava-hf/llava-1.5-7b-hf"
DATASET = "ds_0192a0c1d2e3f4a5b6c7d8"


def test_the_paper_preset_is_the_released_recipe() -> None:
    spec = JobSpec.model_validate({"model": HUB_MODEL, "dataset_id": DATASET, "preset": "paper"})
    hp = spec.hyperparameters
    # shared/DAMA.md section 6: full fine-tune, vision tower frozen, lr 5e-7, cosine, warmup 0.1, weight decay 0,
    # 4 epochs, global batch 16, max length 2048; the released code shards over 4 GPUs.
    assert spec.method == "dama" and spec.lora.enabled is False and spec.lora.train_projector is True
    assert (hp.learning_rate, hp.warmup_ratio, hp.weight_decay, hp.epochs) == (5e-7, 0.1, 0.0, 4)
    assert (hp.batch_size, hp.grad_accumulation, hp.max_length) == (4, 1, 2048)
    assert hp.batch_size * spec.gpus * hp.grad_accumulation == 16  # batch_size is per GPU: the global batch is 16
    assert (spec.gpus, spec.strategy, hp.gradient_checkpointing) == (4, "fsdp", True)

    config = train_config(
        spec,
        StagedInputs(model_path=None, train=Path("/s/train")),
        run_dir=Path("/s/run"),
        cache_dir=Path("/s/cache"),
        dataset_format="trl",
    )
    assert config.objective.method == "dama" and not config.lora.enabled and config.lora.freeze_vision_tower
    assert config.lora.train_projector
    assert (config.optim.learning_rate, config.optim.scheduler, config.optim.warmup_ratio) == (5e-7, "cosine", 0.1)
    assert (config.optim.epochs, config.optim.batch_size, config.data.max_length) == (4, 4, 2048)
    assert config.distributed.strategy == "fsdp" and config.optim.gradient_checkpointing


def test_the_requests_own_values_win_field_by_field() -> None:
    body = {
        "model": HUB_MODEL,
        "dataset_id": DATASET,
        "preset": "paper",
        "gpus": 8,
        "hyperparameters": {"epochs": 1},
    }
    spec = JobSpec.model_validate(body)
    assert spec.gpus == 8 and spec.hyperparameters.epochs == 1
    assert spec.hyperparameters.learning_rate == 5e-7  # the rest of the section still from the preset
    # The recorded spec names the preset and its values: validating it again gives the same job.
    recorded = spec.model_dump(mode="json")
    assert recorded["preset"] == "paper" and JobSpec.model_validate(recorded) == spec


def test_an_evaluation_request_has_no_preset() -> None:
    body = {"model": HUB_MODEL, "generative_dataset_id": DATASET, "preset": "paper"}
    with pytest.raises(ValidationError) as refused:
        EvaluationCreate.model_validate(body)
    assert [error["loc"] for error in refused.value.errors()] == [("preset",)]  # one error, on the field itself


def test_an_unknown_preset_is_refused_with_the_field() -> None:
    with pytest.raises(ValidationError) as refused:
        JobSpec.model_validate({"model": HUB_MODEL, "dataset_id": DATASET, "preset": "papper"})
    assert refused.value.errors()[0]["loc"] == ("preset",)
