"""Job spec -> engine config is a pure function over the shared settings, and nothing the engine can be told is
dropped on the way: every setting of every engine section has a source in the job spec
(``dama_settings.spec_sources.JOB_SPEC_SOURCES``), is the worker's to decide (``WORKER_DECIDES``), or carries an
explicit ``NotExposed`` reason. A setting added to the engine without one fails here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dama_engine.config import TrainConfig
from dama_settings import knobs
from dama_settings.spec_sources import JOB_SPEC_SOURCES, NotExposed
from jobstore.spec import JobSpec
from worker.engine_config import WORKER_DECIDES, StagedInputs, train_config

# Which table of knobs each engine section takes its settings from.
KNOB_TABLES = {
    "objective": knobs.OBJECTIVE,
    "hardness": knobs.HARDNESS,
    "optim": knobs.OPTIM,
    "data": knobs.DATA,
    "model": knobs.MODEL,
    "lora": knobs.LORA,
    "run": knobs.RUN,
    "evaluation": knobs.EVALUATION,
    "distributed": knobs.DISTRIBUTED,
}
HUB_MODEL = "llava-hf/llava-1.5-7b-hf"  # not built in: no staging default (tiny learning rate, fp32) applies


def _engine_sections() -> dict[str, type[BaseModel]]:
    sections: dict[str, type[BaseModel]] = {}
    for name, field in TrainConfig.model_fields.items():
        assert isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel), name
        sections[name] = field.annotation
    return sections


def _unmapped(
    sources: dict[str, dict[str, str | NotExposed]], decides: dict[str, dict[str, str | NotExposed]]
) -> list[str]:
    """Engine settings with no entry (or with two) in the two tables."""
    problems = []
    for section, model in _engine_sections().items():
        for name in model.model_fields:
            entries = int(name in sources.get(section, {})) + int(name in decides.get(section, {}))
            if entries != 1:
                problems.append(f"{section}.{name}: {entries} entries")
    return problems


def test_every_engine_setting_has_a_source_a_worker_decision_or_a_reason() -> None:
    assert not _unmapped(JOB_SPEC_SOURCES, WORKER_DECIDES)
    assert len(_engine_sections()) == 9  # the walk did reach the sections


def test_a_setting_without_a_mapping_is_caught() -> None:
    """The check above is not blind: drop one entry and it names it."""
    broken = copy.deepcopy(JOB_SPEC_SOURCES)
    del broken["optim"]["max_grad_norm"]
    assert _unmapped(broken, WORKER_DECIDES) == ["optim.max_grad_norm: 0 entries"]


def test_every_shared_knob_is_named_and_every_source_is_a_spec_field() -> None:
    for section, table in KNOB_TABLES.items():
        assert set(table) <= set(JOB_SPEC_SOURCES[section]) | set(WORKER_DECIDES.get(section, {})), section
    spec = JobSpec.model_validate(
        {
            "model": HUB_MODEL,
            "dataset_id": "ds_a",
            "evaluation": {"dataset_id": "ds_b", "generative_dataset_id": "ds_c"},
        }
    )
    for section, sources in JOB_SPEC_SOURCES.items():
        for name, source in sources.items():
            if isinstance(source, NotExposed):
                assert source.reason, f"{section}.{name}"
                continue
            value: Any = spec
            for part in source.split("."):
                value = getattr(value, part)  # AttributeError: a source that names no spec field


def test_translation_is_pure_and_carries_every_exposed_setting(tmp_path: Path) -> None:
    """Staged paths that do not exist: the translation reads no file; every exposed knob's spec value arrives."""
    spec = JobSpec.model_validate(
        {
            "model": HUB_MODEL,
            "dataset_id": "ds_a",
            "method": "dama_model",
            "hyperparameters": {
                "beta": 0.3,
                "keep_ratio": 0.6,
                "gamma": 0.5,
                "filter_std": "running",
                "filter_sigma": 2.0,
                "ema_source": "kept",
                "filter_scope": "step",
                "learning_rate": 3e-4,
                "weight_decay": 0.01,
                "warmup_ratio": 0.2,
                "epochs": 3,
                "max_steps": 11,
                "batch_size": 2,
                "grad_accumulation": 2,
                "gradient_checkpointing": True,
                "compile": "off",
                "seed": 7,
                "max_length": 512,
                "max_pixels": 200_704,
                "min_pixels": 3136,
                "max_image_side": 1024,
                "checkpoint_every": 5,
                "keep_checkpoints": 3,
                "eval_every": 4,
            },
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"], "train_projector": True},
            "hardness_scorer": "/models/clip",
            "hardness_rescale": "minmax",
            "strategy": "fsdp",
            "evaluation": {"holdout_fraction": 0.1, "max_new_tokens": 16, "max_samples": 3},
        }
    )
    nowhere = tmp_path / "never-made"
    staged = StagedInputs(model_path=None, train=nowhere / "train")
    config = train_config(spec, staged, run_dir=nowhere / "run", cache_dir=nowhere / "cache", dataset_format="trl")
    assert not nowhere.exists()
    assert config == train_config(
        spec, staged, run_dir=nowhere / "run", cache_dir=nowhere / "cache", dataset_format="trl"
    )
    for section, sources in JOB_SPEC_SOURCES.items():
        for name, source in sources.items():
            if isinstance(source, NotExposed):
                continue
            expected: Any = spec
            for part in source.split("."):
                expected = getattr(expected, part)
            assert getattr(getattr(config, section), name) == expected, f"{section}.{name} <- {source}"
    # And what the worker decides.
    assert (config.model.name_or_path, config.model.precision) == (HUB_MODEL, "auto")
    assert (config.data.train, config.data.format, config.data.eval) == (str(nowhere / "train"), "trl", None)
    assert (config.run.output_dir, config.run.resume) == (str((nowhere / "run").resolve()), True)
    # A staged held-out set replaces the held-out fraction; a built-in model trains in float32.
    with_eval = StagedInputs(model_path=nowhere / "tiny", train=nowhere / "train", eval=nowhere / "eval")
    config = train_config(spec, with_eval, run_dir=nowhere / "run", cache_dir=nowhere / "cache")
    assert (config.data.eval, config.data.eval_fraction) == (str(nowhere / "eval"), 0.0)
    assert (config.model.name_or_path, config.model.precision, config.data.format) == (
        str(nowhere / "tiny"),
        "fp32",
        "auto",
    )
