"""Job spec -> engine config (and evaluation request -> evaluation config) is a pure function over the shared
settings, and nothing the engine can be told is dropped on the way: every setting of every engine section has a
source in the job spec (``dama_settings.spec_sources.JOB_SPEC_SOURCES``; for evaluations
``EVALUATION_SPEC_SOURCES``), is the worker's to decide (``WORKER_DECIDES``, ``EVALUATION_WORKER_DECIDES``), or
carries an explicit ``NotExposed`` reason. A setting added to the engine without one fails here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dama_engine.config import TrainConfig
from dama_engine.evaluation import EvaluationConfig
from dama_settings import knobs
from dama_settings.spec_sources import EVALUATION_SPEC_SOURCES, JOB_SPEC_SOURCES, NotExposed
from jobstore.spec import EvaluationCreate, JobSpec
from worker.engine_config import (
    EVALUATION_WORKER_DECIDES,
    WORKER_DECIDES,
    StagedEvaluation,
    StagedInputs,
    evaluation_config,
    train_config,
)

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


def _value(model: BaseModel, path: str) -> Any:
    """The value at a dotted ``path`` of a spec or a config."""
    value: Any = model
    for part in path.split("."):
        value = getattr(value, part)
    return value


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
            "lora": {
                "enabled": False,
                "r": 4,
                "alpha": 8,
                "dropout": 0.1,
                "target_modules": ["q_proj"],
                "train_projector": True,
            },
            "trust_remote_code": True,
            "hardness_scorer": "/models/clip",
            "hardness_rescale": "minmax",
            "strategy": "fsdp",
            "evaluation": {"holdout_fraction": 0.1, "max_new_tokens": 16, "max_samples": 3, "pope": False},
        }
    )
    # Every exposed setting differs from its default here, so a setting the translation drops (the engine then
    # keeps its default) is caught below.
    defaults = JobSpec.model_validate({"model": HUB_MODEL, "dataset_id": "ds_a", "evaluation": {"dataset_id": "ds_b"}})
    at_default = [
        f"{section}.{name} <- {source}"
        for section, sources in JOB_SPEC_SOURCES.items()
        for name, source in sources.items()
        if not isinstance(source, NotExposed) and _value(spec, source) == _value(defaults, source)
    ]
    assert not at_default, f"set these to non-default values in the test spec: {at_default}"
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
            expected = _value(spec, source)
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


# ---- evaluation jobs: EvaluationCreate -> dama_engine.evaluation.EvaluationConfig --------------------------------


def _evaluation_settings() -> list[str]:
    """Every setting of the engine's evaluation config, by dotted path (a section's settings one level down)."""
    paths = []
    for name, field in EvaluationConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            paths += [f"{name}.{inner}" for inner in section.model_fields]
        else:
            paths.append(name)
    return paths


def _unmapped_evaluation(sources: dict[str, str | NotExposed], decides: dict[str, str | NotExposed]) -> list[str]:
    problems = [
        f"{path}: {entries} entries"
        for path in _evaluation_settings()
        if (entries := int(path in sources) + int(path in decides)) != 1
    ]
    problems += [f"{path}: no such engine setting" for path in {*sources, *decides} - set(_evaluation_settings())]
    return problems


def test_every_evaluation_setting_has_a_source_a_worker_decision_or_a_reason() -> None:
    assert not _unmapped_evaluation(EVALUATION_SPEC_SOURCES, EVALUATION_WORKER_DECIDES)
    assert {"data.max_pairs", "generation.temperature", "hardness.scorer", "beta"} <= set(_evaluation_settings())


def test_an_evaluation_setting_without_a_mapping_is_caught() -> None:
    broken = dict(EVALUATION_SPEC_SOURCES)
    del broken["generation.top_p"]
    assert _unmapped_evaluation(broken, EVALUATION_WORKER_DECIDES) == ["generation.top_p: 0 entries"]


def test_evaluation_translation_is_pure_and_carries_every_exposed_setting(tmp_path: Path) -> None:
    spec = EvaluationCreate.model_validate(
        {
            "model": HUB_MODEL,
            "adapter_job_id": "job_a",
            "preference_dataset_id": "ds_a",
            "generative_dataset_id": "ds_b",
            "generation": {"max_new_tokens": 17, "temperature": 0.7},
            "max_samples": 5,
            "max_pairs": 6,
            "max_length": 777,
            "beta": 0.3,
            "batch_size": 3,
            "trust_remote_code": True,
            "pope": False,
        }
    )
    defaults = EvaluationCreate.model_validate({"model": HUB_MODEL, "preference_dataset_id": "ds_a"})
    exposed = {path: source for path, source in EVALUATION_SPEC_SOURCES.items() if not isinstance(source, NotExposed)}
    at_default = [path for path, source in exposed.items() if _value(spec, source) == _value(defaults, source)]
    assert not at_default, f"set these to non-default values in the test request: {at_default}"
    nowhere = tmp_path / "never-made"
    staged = StagedEvaluation(
        model_path=None,
        preference=nowhere / "pairs",
        generative=nowhere / "gen.jsonl",
        vocabulary=nowhere / "vocabulary.json",
        adapter=nowhere / "adapter",
    )
    config = evaluation_config(spec, staged, run_dir=nowhere / "run", preference_format="rlaif_v")
    assert not nowhere.exists()
    assert config == evaluation_config(spec, staged, run_dir=nowhere / "run", preference_format="rlaif_v")
    for path, source in exposed.items():
        assert _value(config, path) == _value(spec, source), f"{path} <- {source}"
    assert (config.model.name_or_path, config.model.precision, config.adapter) == (
        HUB_MODEL,
        "auto",
        str(nowhere / "adapter"),
    )
    assert (config.data.preference, config.data.format, config.data.vocabulary) == (
        str(nowhere / "pairs"),
        "rlaif_v",
        str(nowhere / "vocabulary.json"),
    )
    assert config.output_dir == str((nowhere / "run").resolve())
