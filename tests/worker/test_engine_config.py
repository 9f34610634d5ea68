"""Job spec -> engine config: paths, the tiny models' defaults, evaluation sources, missing datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dama_engine.config import ConfigError
from dama_engine.proving.ground import ProvingGround
from dama_engine.proving.seeing_base import RECIPE_FILE, seeing_base_recipe
from jobstore.spec import SEEING_MODEL, JobSpec
from tests.worker.conftest import JobStore
from worker import engine_config
from worker.engine_config import (
    DEFAULT_LEARNING_RATE,
    TINY_MODEL_LEARNING_RATE,
    DatasetMissing,
    build_train_config,
    ensure_seeing_base,
    ensure_tiny_model,
    model_cache_root,
    seeing_base_dir,
)


def _spec(dataset_id: str, **values: object) -> JobSpec:
    return JobSpec.model_validate({"model": "dama/tiny-llava", "dataset_id": dataset_id, **values})


def test_a_tiny_model_job_maps_onto_the_engine_config(store: JobStore) -> None:
    dataset_id = store.dataset(48)
    spec = _spec(
        dataset_id,
        method="dama_data",
        hyperparameters={
            "beta": 0.2,
            "keep_ratio": 0.5,
            "max_steps": 7,
            "batch_size": 2,
            "checkpoint_every": 3,
            "filter_scope": "step",
            "filter_std": "running",
            "filter_sigma": 5.0,
            "ema_source": "kept",
        },
        lora={"r": 4, "alpha": 8, "train_projector": True},
        hardness_scorer="/models/clip",
    )
    config = build_train_config(
        spec, job_id="job_a", store=store.artifacts, settings=store.settings, dataset_format="trl"
    )
    assert config.model.name_or_path == str(ensure_tiny_model("llava", model_cache_root(store.settings)))
    assert (Path(config.model.name_or_path) / "config.json").is_file()
    assert config.model.precision == "fp32"
    assert config.optim.learning_rate == TINY_MODEL_LEARNING_RATE  # the spec left the LoRA default
    assert config.data.train == str(store.artifacts.dataset_dir(dataset_id) / "data")
    assert config.data.format == "trl" and config.data.eval is None and config.data.eval_fraction == 0.0
    assert (config.objective.method, config.objective.beta, config.objective.keep_ratio) == ("dama_data", 0.2, 0.5)
    assert config.objective.filter_scope == "step"
    assert (config.objective.filter_std, config.objective.filter_sigma, config.objective.ema_source) == (
        "running",
        5.0,
        "kept",
    )
    assert (config.optim.max_steps, config.optim.batch_size) == (7, 2)
    assert (config.lora.r, config.lora.alpha, config.lora.train_projector) == (4, 8, True)
    assert config.hardness.scorer == "/models/clip"
    assert config.run.output_dir == str(store.artifacts.run_dir("job_a").resolve())
    assert config.run.checkpoint_every == 3 and config.run.resume is True
    assert config.run.cache_dir == str(store.settings.resolved_scratch_dir / "cache")  # the worker's scratch folder


def test_an_explicit_learning_rate_and_a_real_model_are_kept(store: JobStore) -> None:
    dataset_id = store.dataset(48)
    tiny = _spec(dataset_id, hyperparameters={"learning_rate": 3e-4})
    config = build_train_config(tiny, job_id="job_b", store=store.artifacts, settings=store.settings)
    assert config.optim.learning_rate == 3e-4
    real = JobSpec.model_validate({"model": "llava-hf/llava-1.5-7b-hf", "dataset_id": dataset_id})
    config = build_train_config(
        real, job_id="job_c", store=store.artifacts, settings=store.settings, dataset_format="x"
    )
    assert config.model.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert config.model.precision == "auto" and config.optim.learning_rate == 2e-5
    assert config.data.format == "auto"


def test_evaluation_comes_from_a_dataset_or_a_holdout_fraction(store: JobStore) -> None:
    train_id, eval_id = store.dataset(48), store.dataset(8)
    config = build_train_config(
        _spec(train_id, evaluation={"dataset_id": eval_id}), job_id="j", store=store.artifacts, settings=store.settings
    )
    assert config.data.eval == str(store.artifacts.dataset_dir(eval_id) / "data")
    config = build_train_config(
        _spec(train_id, evaluation={"holdout_fraction": 0.2}),
        job_id="j",
        store=store.artifacts,
        settings=store.settings,
    )
    assert config.data.eval is None and config.data.eval_fraction == 0.2


def test_a_dataset_without_files_is_reported(store: JobStore) -> None:
    with pytest.raises(DatasetMissing, match="training dataset ds_gone has no files"):
        build_train_config(_spec("ds_gone"), job_id="j", store=store.artifacts, settings=store.settings)
    with pytest.raises(DatasetMissing, match="evaluation dataset ds_gone"):
        build_train_config(
            _spec(store.dataset(48), evaluation={"dataset_id": "ds_gone"}),
            job_id="j",
            store=store.artifacts,
            settings=store.settings,
        )


def test_tiny_models_are_built_once(tmp_path: Path) -> None:
    first = ensure_tiny_model("llava", tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_tiny_model("llava", tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no build folder left behind


@pytest.mark.slow
def test_the_seeing_base_resolves_to_its_cached_build_and_keeps_the_default_learning_rate(
    store: JobStore, proving_ground: ProvingGround, tmp_path: Path
) -> None:
    settings = store.settings.model_copy(update={"model_cache_dir": tmp_path / "models"})
    # The session's proving ground built its base with the same recipe: in the model cache, the worker reuses it.
    cached = seeing_base_dir(model_cache_root(settings))
    shutil.copytree(proving_ground.base, cached)
    weights = (cached / "model.safetensors").stat().st_mtime_ns
    spec = JobSpec.model_validate(
        {"model": SEEING_MODEL, "dataset_id": store.dataset(48), "evaluation": {"holdout_fraction": 0.2}}
    )
    config = build_train_config(spec, job_id="job_s", store=store.artifacts, settings=settings)
    assert config.model.name_or_path == str(cached) and config.model.precision == "fp32"
    assert (cached / "model.safetensors").stat().st_mtime_ns == weights  # found, not rebuilt
    # A trained base: the random-weight tiny models' learning rate does not replace the spec's.
    assert config.optim.learning_rate == DEFAULT_LEARNING_RATE != TINY_MODEL_LEARNING_RATE


@pytest.mark.slow
def test_the_seeing_base_is_built_once_per_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = {"seed": 0, "steps": 2, "scenes": 16}
    # A folder an interrupted build left behind (no config.json) is not a model: it is replaced.
    seeing_base_dir(tmp_path, small).mkdir(parents=True)
    (seeing_base_dir(tmp_path, small) / "model.safetensors").write_bytes(b"half")
    built = ensure_seeing_base(tmp_path, small)
    assert built == seeing_base_dir(tmp_path, small) and (built / "config.json").is_file()
    assert json.loads((built / RECIPE_FILE).read_text()) == seeing_base_recipe(**small)
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no build folder left behind
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure_seeing_base(tmp_path, small) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp
    assert seeing_base_dir(tmp_path, {**small, "seed": 1}) != built  # another recipe, another folder
    # Pinned across code upgrades: another code version of the same recipe names the same folder.
    monkeypatch.setattr(
        engine_config,
        "seeing_base_recipe",
        lambda **values: {**seeing_base_recipe(**values), "code": "another version"},
    )
    assert seeing_base_dir(tmp_path, small) == built


def test_init_adapter_is_copied_into_the_job_once(store: JobStore) -> None:
    dataset_id = store.dataset(48)
    source = store.artifacts.run_dir("job_src") / "checkpoints" / "step-000020" / "adapter"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (source / "adapter_model.safetensors").write_bytes(b"weights at step 20")
    spec = _spec(dataset_id, init_adapter="job_src:20", hyperparameters={"keep_checkpoints": 5})
    config = build_train_config(spec, job_id="job_next", store=store.artifacts, settings=store.settings)
    start = Path(str(config.model.init_adapter))
    assert start == store.artifacts.job_dir("job_next") / "init_adapter"
    assert (start / "adapter_model.safetensors").read_bytes() == b"weights at step 20"
    assert config.run.keep_checkpoints == 5
    # Pruned at the source later: a resumed attempt still has its own copy.
    (source / "adapter_model.safetensors").unlink()
    again = build_train_config(spec, job_id="job_next", store=store.artifacts, settings=store.settings)
    assert again.model.init_adapter == config.model.init_adapter
    # A fresh job whose source is gone is a user error that says what to do.
    with pytest.raises(ConfigError, match=r"init_adapter: job_src:20 has no adapter .*\.keep_checkpoints"):
        build_train_config(spec, job_id="job_other", store=store.artifacts, settings=store.settings)
    # Bare id: the source job's final adapter folder.
    final = store.artifacts.run_dir("job_src") / "adapter"
    final.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (final / name).write_text(name)
    bare = build_train_config(
        _spec(dataset_id, init_adapter="job_src"), job_id="job_bare", store=store.artifacts, settings=store.settings
    )
    assert (Path(str(bare.model.init_adapter)) / "adapter_model.safetensors").read_text() == (
        "adapter_model.safetensors"
    )


def test_a_judge_target_obeys_the_webhooks_address_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """DAMA_JUDGE_TARGETS parsed; its key read from the worker's environment (a file's newline dropped); a loopback
    host refused unless it is on DAMA_JUDGE_ALLOWED_HOSTS, and a name that resolves nowhere refused, each with a
    message that names no host or address (the log does); a target gone from the settings reported."""
    from jobstore.settings import Settings
    from worker.engine_config import judge_target

    targets = json.dumps(
        {
            "local": {"url": "http://127.0.0.1:8001/v1", "model": "dama/tiny-seeing-llava", "api_key_env": "JUDGE_K"},
            "nowhere": {"url": "https://judge.invalid/v1", "model": "m"},
        }
    )
    monkeypatch.setenv("DAMA_JUDGE_TARGETS", targets)
    monkeypatch.setenv("JUDGE_K", "s3cret\n")
    settings = Settings(home=tmp_path)
    assert settings.judge_targets["local"].api_key_env == "JUDGE_K"
    for name, detail in (
        ("local", "127.0.0.1 resolves to 127.0.0.1, a loopback address (not on DAMA_JUDGE_ALLOWED_HOSTS)"),
        ("nowhere", "cannot resolve judge.invalid"),
    ):
        caplog.clear()
        with pytest.raises(ConfigError) as refused:
            judge_target(name, settings)
        assert str(refused.value) == (
            f"judge {name!r} cannot be reached from this service's workers (the operator's worker log says why)"
        )
        assert detail in caplog.text
    with pytest.raises(ConfigError, match="'gone' is no longer a judge of this service"):
        judge_target("gone", settings)

    monkeypatch.setenv("DAMA_JUDGE_ALLOWED_HOSTS", "127.0.0.1")
    values, address = judge_target("local", Settings(home=tmp_path))
    assert address == "127.0.0.1"
    assert values["api_key"] == "s3cret" and values["name"] == "local" and values["model"] == "dama/tiny-seeing-llava"
    assert "prompt" not in values  # the engine's listing prompt

    monkeypatch.setenv("DAMA_JUDGE_TARGETS", json.dumps({"bad": {"url": "ftp://x/v1", "model": "m"}}))
    with pytest.raises(ValueError, match="must be an http:// or https:// URL"):
        Settings(home=tmp_path)
