"""A stored job spec plus where things live on this worker -> the engine's :class:`TrainConfig`.

Field names follow the engine's; this module only decides paths and the few service-level defaults:

* the dataset is the folder the API unpacked, ``ArtifactStore.dataset_dir(id)/data`` (one data file + images);
* the run writes to ``ArtifactStore.run_dir(job_id)`` with ``run.resume=True``, so a re-queued job continues
  from its newest checkpoint there;
* reference log-probs and hardness are cached in ``<artifacts>/cache``, shared by all jobs: the engine keys each
  entry by the dataset's content and the model, so another job on the same data and base model reuses them;
* the built-in tiny models (``dama/tiny-*``) are built once into the model cache and trained in float32.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from dama_engine.config import TrainConfig, parse_config
from dama_engine.tiny import build_tiny_model
from jobstore.artifacts import ArtifactStore
from jobstore.settings import Settings
from jobstore.spec import Hyperparameters, JobSpec

log = logging.getLogger(__name__)

# A randomly initialised tiny model needs a far larger step than a pretrained one (the CLI demo uses the same):
# with the LoRA default of 2e-5 it would not move measurably in a demo-sized run.
TINY_MODEL_LEARNING_RATE = 1e-2
DEFAULT_LEARNING_RATE = Hyperparameters.model_fields["learning_rate"].default
TINY_MODEL_SEED = 0
ENGINE_FORMATS = ("trl", "rlaif_v", "openai")


class DatasetMissing(ValueError):
    """The job's dataset has no files on the artifact store (deleted, or never unpacked)."""


def model_cache_root(settings: Settings) -> Path:
    return (settings.model_cache_dir or settings.resolved_artifacts_dir / "models").resolve()


def ensure_tiny_model(family: str, cache_root: Path) -> Path:
    """The built-in tiny ``family`` model, built on first use. Several workers may race: each builds into a
    private folder and renames it into place (atomic), so nobody ever loads a half-written model."""
    target = cache_root / "dama-tiny" / f"{family}-seed{TINY_MODEL_SEED}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("building the tiny %s model into %s", family, target)
    build_tiny_model(family, scratch, seed=TINY_MODEL_SEED)
    try:
        scratch.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(scratch, ignore_errors=True)  # another worker finished first; theirs is identical
    return target


def dataset_folder(store: ArtifactStore, dataset_id: str) -> Path:
    return store.dataset_dir(dataset_id) / "data"


def _existing_dataset(store: ArtifactStore, dataset_id: str, role: str) -> Path:
    folder = dataset_folder(store, dataset_id)
    if not folder.is_dir():
        raise DatasetMissing(
            f"{role} dataset {dataset_id} has no files on the workers' artifact store ({folder}); "
            "it was deleted or its upload did not finish - upload it again and create a new job"
        )
    return folder


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
    tiny_family = spec.tiny_family
    model_path = str(ensure_tiny_model(tiny_family, model_cache_root(settings))) if tiny_family else spec.model
    learning_rate = hp.learning_rate
    if tiny_family and learning_rate == DEFAULT_LEARNING_RATE:
        learning_rate = TINY_MODEL_LEARNING_RATE  # only when the spec left the LoRA default in place

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

    values: dict[str, Any] = {
        "model": {
            "name_or_path": model_path,
            "trust_remote_code": spec.trust_remote_code,
            # Tiny models: float32 everywhere, so CPU runs and GPU runs agree and bf16 rounding cannot swamp them.
            "precision": "fp32" if tiny_family else "auto",
        },
        "data": data,
        "lora": {
            "enabled": lora.enabled,
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": lora.target_modules,
            "train_projector": lora.train_projector,
        },
        "objective": {"method": spec.method, "beta": hp.beta, "keep_ratio": hp.keep_ratio, "gamma": hp.gamma},
        "hardness": {"scorer": spec.hardness_scorer},
        "optim": {
            "learning_rate": learning_rate,
            "weight_decay": hp.weight_decay,
            "warmup_ratio": hp.warmup_ratio,
            "epochs": hp.epochs,
            "max_steps": hp.max_steps,
            "batch_size": hp.batch_size,
            "grad_accumulation": hp.grad_accumulation,
            "gradient_checkpointing": hp.gradient_checkpointing,
            "seed": hp.seed,
        },
        "run": {
            "output_dir": str(store.run_dir(job_id).resolve()),
            "cache_dir": str((store.root / "cache").resolve()),
            "checkpoint_every": hp.checkpoint_every,
            "eval_every": hp.eval_every,
            "resume": True,
        },
    }
    return parse_config(values)
