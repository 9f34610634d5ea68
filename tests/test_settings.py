"""One definition per setting (dama_settings): every field of the engine config, the job spec and the objective
that a knob of ``dama_settings.knobs`` names carries that knob's default, bounds, description and allowed values,
and the names shared across the engine/service boundary (stages, methods, families, suffixes) agree.

Every field is compared, not a sample: a new field on either side that is not in the tables below fails."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from api.routers.models import FAMILIES
from api.uploads import KNOWN_SUFFIXES, upload_suffix
from dama_engine import callbacks, config
from dama_engine.data.archives import DATA_SUFFIXES
from dama_engine.models import families
from dama_engine.objective.loss import METHODS, ObjectiveConfig
from dama_engine.objective.scoring import HardnessConfig
from dama_settings import knobs, names
from dama_settings.families import FAMILY_LAYOUTS
from dama_settings.setting import SAME, Setting
from jobstore import spec, states

# Fields of the engine config that are the engine's alone (defined once, in dama_engine.config).
ENGINE_ONLY = {
    "ModelSection": {"name_or_path", "revision", "attn_implementation", "init_adapter", "public_name"},
    "DataSection": {"train", "eval"},
    "LoraSection": {"freeze_vision_tower"},
    "EvaluationSection": {"enabled", "generative", "vocabulary", "max_pairs"},
    "RunSection": {"output_dir", "cache_dir", "log_every", "resume", "distributed_timeout_s", "threads"},
}

ENGINE_SECTIONS: dict[type[BaseModel], dict[str, Setting]] = {
    config.ModelSection: knobs.MODEL,
    config.DataSection: knobs.DATA,
    config.LoraSection: knobs.LORA,
    config.ObjectiveSection: knobs.OBJECTIVE,
    config.HardnessSection: knobs.HARDNESS,
    config.OptimSection: knobs.OPTIM,
    config.EvaluationSection: knobs.EVALUATION,
    config.RunSection: knobs.RUN,
    config.DistributedSection: knobs.DISTRIBUTED,
}

# The job spec's fields: each names the knob it is (the service caps and defaults applied).
SPEC_FIELDS: dict[type[BaseModel], dict[str, Setting | None]] = {
    spec.Hyperparameters: {
        "beta": knobs.OBJECTIVE["beta"],
        "keep_ratio": knobs.OBJECTIVE["keep_ratio"],
        "gamma": knobs.OBJECTIVE["gamma"],
        "filter_scope": knobs.OBJECTIVE["filter_scope"],
        "filter_std": knobs.OBJECTIVE["filter_std"],
        "filter_sigma": knobs.OBJECTIVE["filter_sigma"],
        "ema_source": knobs.OBJECTIVE["ema_source"],
        "learning_rate": knobs.OPTIM["learning_rate"],
        "epochs": knobs.OPTIM["epochs"],
        "max_steps": knobs.OPTIM["max_steps"],
        "batch_size": knobs.OPTIM["batch_size"],
        "grad_accumulation": knobs.OPTIM["grad_accumulation"],
        "warmup_ratio": knobs.OPTIM["warmup_ratio"],
        "weight_decay": knobs.OPTIM["weight_decay"],
        "max_length": knobs.DATA["max_length"],
        "max_pixels": knobs.DATA["max_pixels"],
        "min_pixels": knobs.DATA["min_pixels"],
        "max_image_side": knobs.DATA["max_image_side"],
        "gradient_checkpointing": knobs.OPTIM["gradient_checkpointing"],
        "compile": knobs.OPTIM["compile"],
        "seed": knobs.OPTIM["seed"],
        "checkpoint_every": knobs.RUN["checkpoint_every"],
        "keep_checkpoints": knobs.RUN["keep_checkpoints"],
        "eval_every": knobs.RUN["eval_every"],
    },
    spec.LoraSpec: {name: setting for name, setting in knobs.LORA.items()},
    spec.EvaluationSpec: {
        "dataset_id": None,
        "holdout_fraction": knobs.DATA["eval_fraction"],
        "generative_dataset_id": None,
        "max_new_tokens": knobs.EVALUATION["max_new_tokens"],
        "max_samples": knobs.EVALUATION["max_samples"],
        "pope": knobs.EVALUATION["pope"],
    },
    spec.JobSpec: {
        "preset": None,
        "model": None,
        "dataset_id": None,
        "method": knobs.OBJECTIVE["method"],
        "hyperparameters": None,
        "lora": None,
        "evaluation": None,
        "hardness_scorer": knobs.HARDNESS["scorer"],
        "hardness_rescale": knobs.HARDNESS["rescale"],
        "trust_remote_code": knobs.MODEL["trust_remote_code"],
        "gpus": None,
        "strategy": knobs.DISTRIBUTED["strategy"],
        "queue": None,
        "suffix": None,
        "init_adapter": None,
        "integrations": None,
    },
}


def _bounds(info: FieldInfo) -> dict[str, float]:
    found: dict[str, float] = {}
    for item in info.metadata:
        for kind in ("gt", "ge", "lt", "le"):
            if isinstance(item, getattr(annotated_types, kind.capitalize())):
                found[kind] = getattr(item, kind)
    return found


def _expected_bounds(setting: Setting, *, service: bool) -> dict[str, float]:
    bounds = {kind: getattr(setting, kind) for kind in ("gt", "ge", "lt", "le") if getattr(setting, kind) is not None}
    if service and setting.service_le is not None:
        bounds["le"] = min(bounds.get("le", math.inf), setting.service_le)
    return bounds


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The string values a field's annotation allows (a Literal, possibly inside Optional), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def _assert_field(owner: str, name: str, info: FieldInfo, setting: Setting, *, service: bool) -> None:
    where = f"{owner}.{name}"
    default = setting.service_default if service and setting.service_default is not SAME else setting.default
    assert info.default == default, f"{where}: default {info.default!r} != {default!r}"
    assert _bounds(info) == _expected_bounds(setting, service=service), f"{where}: bounds"
    assert info.description == setting.description, f"{where}: description"
    assert _choices(info.annotation) == setting.choices, f"{where}: allowed values"


@pytest.mark.parametrize("section", list(ENGINE_SECTIONS), ids=lambda section: section.__name__)
def test_every_engine_config_field_is_its_knob(section: type[BaseModel]) -> None:
    table = ENGINE_SECTIONS[section]
    own = ENGINE_ONLY.get(section.__name__, set())
    fields = section.model_fields
    assert set(fields) - own == set(table), f"{section.__name__}: fields and knobs differ"
    for name in set(table):
        _assert_field(section.__name__, name, fields[name], table[name], service=False)


@pytest.mark.parametrize("model", list(SPEC_FIELDS), ids=lambda model: model.__name__)
def test_every_job_spec_field_is_its_knob(model: type[BaseModel]) -> None:
    table = SPEC_FIELDS[model]
    assert set(model.model_fields) == set(table), f"{model.__name__}: a field is not in the table"
    for name, setting in table.items():
        if setting is not None:
            _assert_field(model.__name__, name, model.model_fields[name], setting, service=True)


def _probe_values(setting: Setting) -> tuple[list[Any], list[Any]]:
    """Values ObjectiveConfig must accept and must refuse, from the knob's bounds and choices."""
    if setting.choices is not None:
        return list(setting.choices), ["not-a-choice"]
    accepted, refused = [setting.default], []
    for kind, inclusive in (("ge", True), ("le", True), ("gt", False), ("lt", False)):
        bound = getattr(setting, kind)
        if bound is None:
            continue
        step = 1e-9 if kind in ("ge", "gt") else -1e-9
        if inclusive:
            accepted.append(float(bound))
            refused.append(float(bound) - step)
        else:
            accepted.append(float(bound) + step)
            refused.append(float(bound))
    return accepted, refused


def test_every_objective_field_has_its_knobs_default_and_bounds() -> None:
    objective_fields = {f.name: f for f in dataclasses.fields(ObjectiveConfig)}
    hints = typing.get_type_hints(ObjectiveConfig)
    # std_eps is a numerical floor of the objective, not a setting of the run.
    assert set(objective_fields) - {"std_eps"} == set(knobs.OBJECTIVE)
    for name in sorted(set(knobs.OBJECTIVE)):
        setting = knobs.OBJECTIVE[name]
        assert objective_fields[name].default == setting.default, name
        assert _choices(hints[name]) == setting.choices, name
        # beta_max must also exceed beta_min: probe it with a floor below every probe value.
        others = {"beta_min": 1e-12} if name == "beta_max" else {}
        accepted, refused = _probe_values(setting)
        for value in accepted:
            ObjectiveConfig(**{name: value, **others})
        for value in refused:
            with pytest.raises(ValueError, match=name):
                ObjectiveConfig(**{name: value, **others})


def test_hardness_config_defaults_are_the_knobs() -> None:
    defaults = HardnessConfig()
    for name, setting in knobs.HARDNESS.items():
        assert getattr(defaults, name) == setting.default, name
    with pytest.raises(ValueError, match="rescale"):
        HardnessConfig(rescale="zscore")  # type: ignore[arg-type]


def test_stage_and_method_names_agree() -> None:
    assert callbacks.STAGES == states.STAGES == names.STAGES
    assert typing.get_args(names.Stage) == names.STAGES
    assert METHODS == names.METHODS == typing.get_args(spec.Method)


def test_the_families_listed_by_the_api_are_the_engines() -> None:
    engine = families.FAMILY_SPECS
    assert [layout.name for layout in FAMILY_LAYOUTS] == [family.name for family in engine]
    for layout, family, public in zip(FAMILY_LAYOUTS, engine, FAMILIES, strict=True):
        for field in dataclasses.fields(layout):
            assert getattr(family, field.name) == getattr(layout, field.name), (family.name, field.name)
        assert public.name == family.name
        assert tuple(public.model_types) == family.model_types
        assert public.language_model_prefix == family.language_model_prefix
        assert tuple(public.vision_tower_prefixes) == family.vision_tower_prefixes
        assert tuple(public.projector_prefixes) == family.projector_prefixes
        assert tuple(public.default_lora_target_modules) == family.lora_leaf_names
        assert public.default_lora_target_regex == family.lora_target_regex


def test_the_api_accepts_the_data_files_the_engine_reads() -> None:
    assert DATA_SUFFIXES == names.DATA_FILE_SUFFIXES
    assert set(KNOWN_SUFFIXES) == set(names.DATA_FILE_SUFFIXES) | set(names.ARCHIVE_SUFFIXES)
    for suffix in KNOWN_SUFFIXES:
        assert upload_suffix(f"pairs{suffix.upper()}") == suffix  # the longest match wins (.tar.gz, .jsonl)


def test_the_tiny_models_the_service_offers_are_the_ones_the_engine_builds() -> None:
    from dama_engine.models import tiny

    assert sorted(spec.TINY_MODELS.values()) == sorted(tiny.FAMILIES)
    assert set(tiny.FAMILIES) <= {layout.name for layout in FAMILY_LAYOUTS}
