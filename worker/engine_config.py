"""A stored job spec plus where things live on this worker -> the engine's :class:`TrainConfig`.

Field names follow the engine's; this module only decides paths and the few service-level defaults:

* the dataset is the folder the API unpacked, ``ArtifactStore.dataset_dir(id)/data`` (one data file + images);
* the run writes to ``ArtifactStore.run_dir(job_id)`` with ``run.resume=True``, so a re-queued job continues
  from its newest checkpoint there;
* with an S3 store, datasets (and a tuned adapter) are first staged into the worker's scratch folder;
* reference log-probs and hardness are cached in ``<scratch>/cache``, shared by all jobs: the engine keys each
  entry by the dataset's content and the model, so another job on the same data and base model reuses them;
* the built-in tiny models (``dama/tiny-*``) are built once into the model cache and trained in float32; the
  random-weight ones get :data:`TINY_MODEL_LEARNING_RATE` when the spec leaves the learning rate at its default,
  the seeing base (``dama/tiny-seeing-llava``, :func:`ensure_seeing_base`) does not: it is trained, and a job on it
  gives its settings as any job on a pretrained model does (the demo sends ``dama_engine.proving``'s);
* a generative evaluation dataset is its folder's JSONL file and ``vocabulary.json``
  (:func:`dama_engine.data.generative.find_generative_files`);
* an evaluation job (:func:`build_evaluation_config`) writes to its own ``run_dir`` and reads the tuned adapter of a
  training job from that job's ``run_dir(job_id)/adapter``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dama_engine.config import ConfigError, ModelSection, TrainConfig, parse_config
from dama_engine.data import find_generative_files
from dama_engine.evaluation import EvaluationConfig, parse_evaluation_config
from dama_engine.models import build_tiny_model
from dama_engine.proving import BASE as SEEING_BASE_RECIPE
from dama_engine.proving import build_seeing_base, seeing_base_recipe
from dama_engine.training import ADAPTER_DIR, checkpoint_dir
from jobstore.artifacts import ArtifactStore
from jobstore.settings import Settings
from jobstore.spec import SEEING_MODEL, TINY_MODELS, EvaluationCreate, Hyperparameters, JobSpec

log = logging.getLogger(__name__)

# A randomly initialised tiny model needs a far larger step than a pretrained one (the CLI demo uses the same):
# with the LoRA default of 2e-5 it would not move measurably in a demo-sized run.
TINY_MODEL_LEARNING_RATE = 1e-2
DEFAULT_LEARNING_RATE = Hyperparameters.model_fields["learning_rate"].default
TINY_MODEL_SEED = 0
ENGINE_FORMATS = ("trl", "rlaif_v", "openai")


class DatasetMissing(ValueError):
    """The job's dataset has no files on the artifact store (deleted, or never unpacked)."""


class AdapterMissing(ValueError):
    """The training job an evaluation names has no adapter on the artifact store."""


def model_cache_root(settings: Settings) -> Path:
    return (settings.model_cache_dir or settings.resolved_scratch_dir / "models").resolve()


def _built_once(target: Path, build: Callable[[Path], object]) -> Path:
    """``target``, built on first use by ``build(folder)``. Several workers (also in containers sharing the cache,
    where process ids repeat) may race: each builds into its own fresh folder and renames it into place (atomic),
    so nobody ever loads a half-written model; a folder without ``config.json`` is not a built model."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
    log.info("building %s", target)
    try:
        build(scratch)
        if target.is_dir() and not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a leftover of an interrupted build before this rule
        scratch.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # another worker finished first (theirs is identical), or failed
    return target


def ensure_tiny_model(family: str, cache_root: Path) -> Path:
    """The built-in tiny ``family`` model (random weights), built on first use."""
    target = cache_root / "dama-tiny" / f"{family}-seed{TINY_MODEL_SEED}"
    return _built_once(target, lambda folder: build_tiny_model(family, folder, seed=TINY_MODEL_SEED))


def seeing_base_dir(cache_root: Path, base: Mapping[str, int] = SEEING_BASE_RECIPE) -> Path:
    """Where the seeing base of recipe ``base`` lives in the model cache: named by the recipe's values (seed, steps,
    scenes, sizes, confusions) and not by the code version, so the weights a model name denotes stay pinned across
    upgrades of the worker's code (jobs trained on them, their exports and later evaluations all load the same
    base); a changed recipe is a new folder, and a cached folder is never rebuilt in place (delete it to rebuild)."""
    values = {key: value for key, value in seeing_base_recipe(**base).items() if key != "code"}
    wanted = json.dumps(values, sort_keys=True)
    return cache_root / "dama-tiny" / f"seeing-llava-{hashlib.sha256(wanted.encode()).hexdigest()[:16]}"


def ensure_seeing_base(cache_root: Path, base: Mapping[str, int] = SEEING_BASE_RECIPE) -> Path:
    """``dama/tiny-seeing-llava``: :func:`dama_engine.proving.seeing_base.build_seeing_base` with the proving ground's
    recipe (``dama_engine.proving.BASE``), built on first use (about 1 min on a CPU core)."""
    return _built_once(seeing_base_dir(cache_root, base), lambda folder: build_seeing_base(folder, **base))


def dataset_folder(store: ArtifactStore, dataset_id: str) -> Path:
    return store.dataset_dir(dataset_id) / "data"


def _existing_dataset(store: ArtifactStore, dataset_id: str, role: str) -> Path:
    folder = dataset_folder(store, dataset_id)
    store.fetch(folder)  # staged into this worker's scratch folder when the store is remote
    if not folder.is_dir():
        raise DatasetMissing(
            f"{role} dataset {dataset_id} has no files on the workers' artifact store ({folder}); "
            "it was deleted or its upload did not finish - upload it again and create a new job"
        )
    return folder


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def starting_adapter(spec: JobSpec, *, job_id: str, store: ArtifactStore) -> Path:
    """The adapter the job starts from, copied into its own folder on the first attempt (the source checkpoint
    may be pruned later, and a resumed attempt needs the same start and the same reference cache key).

    The API checked that the source is this tenant's job on the same base; here only its files are looked for.
    With an S3 store the copy is published at once (a resumed attempt on another worker fetches it), and the
    source is fetched into this worker's scratch folder first.
    """
    assert spec.init_source is not None
    target = store.job_dir(job_id) / "init_adapter"
    store.fetch(target)
    if all((target / name).is_file() for name in ADAPTER_FILES):
        return target
    source_job, step = spec.init_source
    source = checkpoint_dir(store.run_dir(source_job), step) / ADAPTER_DIR if step is not None else None
    source = source or adapter_folder(store, source_job)
    store.fetch(source)
    missing = [name for name in ADAPTER_FILES if not (source / name).is_file()]
    if missing:
        raise ConfigError(
            f"init_adapter: {spec.init_adapter} has no adapter on the workers' artifact store any more (pruned or "
            "deleted); start from a kept checkpoint (GET /jobs/{id}/checkpoints) or keep more of them with "
            "hyperparameters.keep_checkpoints"
        )
    partial = target.with_name("init_adapter.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(source / name, partial / name)
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    store.publish(target)
    return target


def generative_files(store: ArtifactStore, dataset_id: str, role: str) -> tuple[Path, Path]:
    """The generative evaluation set's JSONL file and vocabulary in dataset ``dataset_id``'s folder."""
    folder = _existing_dataset(store, dataset_id, role)
    found = find_generative_files(folder)
    if found is None:
        raise DatasetMissing(
            f"{role} dataset {dataset_id} is not a generative evaluation set (a JSONL file of image, prompt and "
            "objects beside vocabulary.json)"
        )
    return found


def _model_values(model: str, trust_remote_code: bool, settings: Settings) -> tuple[dict[str, Any], str | None]:
    if trust_remote_code and not settings.allow_remote_code:
        # Checked again here: the worker is where the code would run.
        raise ConfigError("trust_remote_code: not allowed on this service (DAMA_ALLOW_REMOTE_CODE is off)")
    tiny_family = TINY_MODELS.get(model)
    model_path: Path | None = None
    if tiny_family:
        model_path = ensure_tiny_model(tiny_family, model_cache_root(settings))
    elif model == SEEING_MODEL:
        model_path = ensure_seeing_base(model_cache_root(settings))
    values = {
        "name_or_path": model if model_path is None else str(model_path),
        "trust_remote_code": trust_remote_code,
        # Built-in models: float32 everywhere, so CPU runs and GPU runs agree and bf16 rounding cannot swamp them.
        "precision": "auto" if model_path is None else "fp32",
    }
    return values, tiny_family


def build_train_config(
    spec: JobSpec,
    *,
    job_id: str,
    store: ArtifactStore,
    settings: Settings,
    dataset_format: str | None = None,
) -> TrainConfig:
    """The engine config of one job (raises :class:`DatasetMissing` or the engine's ``ConfigError``)."""
    hp, lora = spec.hyperparameters, spec.lora
    model, tiny_family = _model_values(spec.model, spec.trust_remote_code, settings)
    learning_rate = hp.learning_rate
    if tiny_family and learning_rate == DEFAULT_LEARNING_RATE:
        learning_rate = TINY_MODEL_LEARNING_RATE  # random-weight tiny models, when the spec left the LoRA default

    data: dict[str, Any] = {
        "train": str(_existing_dataset(store, spec.dataset_id, "training")),
        "format": dataset_format if dataset_format in ENGINE_FORMATS else "auto",
        "max_length": hp.max_length,
    }
    if spec.evaluation is not None:
        if spec.evaluation.dataset_id:
            data["eval"] = str(_existing_dataset(store, spec.evaluation.dataset_id, "evaluation"))
        else:
            data["eval_fraction"] = spec.evaluation.holdout_fraction
    evaluation: dict[str, Any] = {}
    if spec.evaluation is not None:
        evaluation["max_new_tokens"] = spec.evaluation.max_new_tokens
        if spec.evaluation.generative_dataset_id:
            generative, vocabulary = generative_files(store, spec.evaluation.generative_dataset_id, "generative")
            evaluation.update(
                generative=str(generative), vocabulary=str(vocabulary), max_samples=spec.evaluation.max_samples
            )

    if spec.init_source is not None:
        model["init_adapter"] = str(starting_adapter(spec, job_id=job_id, store=store))
    values: dict[str, Any] = {
        "model": model,
        "data": data,
        "evaluation": evaluation,
        "lora": {
            "enabled": lora.enabled,
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": lora.target_modules,
            "train_projector": lora.train_projector,
        },
        "objective": {
            "method": spec.method,
            "beta": hp.beta,
            "keep_ratio": hp.keep_ratio,
            "gamma": hp.gamma,
            "filter_scope": hp.filter_scope,
            "filter_std": hp.filter_std,
            "filter_sigma": hp.filter_sigma,
            "ema_source": hp.ema_source,
        },
        "hardness": {"scorer": spec.hardness_scorer, "rescale": spec.hardness_rescale},
        "optim": {
            "learning_rate": learning_rate,
            "weight_decay": hp.weight_decay,
            "warmup_ratio": hp.warmup_ratio,
            "epochs": hp.epochs,
            "max_steps": hp.max_steps,
            "batch_size": hp.batch_size,
            "grad_accumulation": hp.grad_accumulation,
            "gradient_checkpointing": hp.gradient_checkpointing,
            "compile": hp.compile,
            "seed": hp.seed,
        },
        "run": {
            "output_dir": str(store.run_dir(job_id).resolve()),
            "cache_dir": str(settings.resolved_scratch_dir / "cache"),
            "checkpoint_every": hp.checkpoint_every,
            "keep_checkpoints": hp.keep_checkpoints,
            "eval_every": hp.eval_every,
            "resume": True,
        },
    }
    return parse_config(values)


def model_section(spec: JobSpec, settings: Settings) -> ModelSection:
    """The base model of a training job as the engine loads it (a built-in tiny model: its built folder)."""
    values, _ = _model_values(spec.model, spec.trust_remote_code, settings)
    return ModelSection(**values)


def adapter_folder(store: ArtifactStore, job_id: str) -> Path:
    """Where a training job's exported adapter lives on the workers."""
    return store.run_dir(job_id) / "adapter"


def build_evaluation_config(
    spec: EvaluationCreate,
    *,
    job_id: str,
    store: ArtifactStore,
    settings: Settings,
    preference_format: str | None = None,
) -> EvaluationConfig:
    """The engine config of one evaluation job (raises :class:`DatasetMissing`, :class:`AdapterMissing` or the
    engine's ``ConfigError``)."""
    model, _ = _model_values(spec.model, spec.trust_remote_code, settings)
    data: dict[str, Any] = {
        "max_samples": spec.max_samples,
        "max_pairs": spec.max_pairs,
        "max_length": spec.max_length,
    }
    if spec.preference_dataset_id:
        data["preference"] = str(_existing_dataset(store, spec.preference_dataset_id, "preference"))
        data["format"] = preference_format if preference_format in ENGINE_FORMATS else "auto"
    if spec.generative_dataset_id:
        generative, vocabulary = generative_files(store, spec.generative_dataset_id, "generative")
        data.update(generative=str(generative), vocabulary=str(vocabulary))
    adapter = None
    if spec.adapter_job_id:
        folder = adapter_folder(store, spec.adapter_job_id)
        store.fetch(folder)
        if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise AdapterMissing(
                f"adapter_job_id: job {spec.adapter_job_id} has no adapter on the workers' artifact store ({folder})"
            )
        adapter = str(folder.resolve())
    values: dict[str, Any] = {
        "model": model,
        "adapter": adapter,
        "data": data,
        "generation": {
            "max_new_tokens": spec.generation.max_new_tokens,
            "temperature": spec.generation.temperature,
        },
        "beta": spec.beta,
        "batch_size": spec.batch_size,
        "output_dir": str(store.run_dir(job_id).resolve()),
    }
    return parse_evaluation_config(values)


def evaluation_passes(spec: dict[str, Any]) -> int:
    """How many model passes an evaluation job makes (log-probs and generation, once per model): its progress unit."""
    models = 2 if spec.get("adapter_job_id") else 1
    sets = int(bool(spec.get("preference_dataset_id"))) + int(bool(spec.get("generative_dataset_id")))
    return max(1, models * sets)
