"""A stored job spec plus where things live on this worker -> the engine's :class:`TrainConfig`, in two steps.

1. Staging (:func:`stage_training_inputs`, :func:`stage_evaluation_inputs`): the only step with side effects. It
   fetches the datasets (and a tuned or starting adapter) from the artifact store, builds a built-in base model
   into the model cache and copies the starting adapter, and answers local paths (:class:`StagedInputs`).
2. Translation (:func:`train_config`, :func:`evaluation_config`): pure functions of the spec and the staged paths.
   Every knob comes from the spec through ``dama_settings.spec_sources.JOB_SPEC_SOURCES`` (an evaluation request's
   through ``EVALUATION_SPEC_SOURCES``; no hand-copied list); what the spec does not carry is the worker's
   (:data:`WORKER_DECIDES`, :data:`EVALUATION_WORKER_DECIDES`). A test fails when an engine setting is in neither
   table (tests/worker/test_spec_translation.py).

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
* an evaluation job (:func:`evaluation_config`) writes to its own ``run_dir`` and reads the tuned adapter of a
  training job from that job's ``run_dir(job_id)/adapter``;
* a pair generation (:func:`stage_pair_inputs`, :func:`pairs_config`) stages its starting adapter as a training job
  does (a copy in its own folder) and writes to ``run_dir(job_id)/pairs`` (:mod:`worker.pair_dataset` then moves
  the dataset into the dataset store).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dama_engine.config import ConfigError, ModelSection, TrainConfig, parse_config
from dama_engine.data import find_generative_files
from dama_engine.evaluation import EvaluationConfig, parse_evaluation_config
from dama_engine.models import build_tiny_model
from dama_engine.pairs import PairsConfig, parse_pairs_config
from dama_engine.proving import BASE as SEEING_BASE_RECIPE
from dama_engine.proving import build_seeing_base, seeing_base_recipe
from dama_engine.training import ADAPTER_DIR, checkpoint_dir
from dama_settings.spec_sources import EVALUATION_SPEC_SOURCES, JOB_SPEC_SOURCES, NotExposed
from jobstore.artifacts import ArtifactStore
from jobstore.settings import Settings
from jobstore.spec import (
    BUILTIN_MODELS,
    SEEING_MODEL,
    TINY_MODELS,
    EvaluationCreate,
    Hyperparameters,
    JobSpec,
    PairGenerationCreate,
)
from jobstore.webhooks import RefusedTarget, pinned_address

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


def build_builtin_model(model: str, folder: Path) -> None:
    """Build the built-in model ``model`` (``dama/...``) into ``folder``: the weights a worker builds (identical
    when both build on a CPU), so an adapter downloaded from the service loads on it elsewhere."""
    tiny_family = TINY_MODELS.get(model)
    if tiny_family:
        build_tiny_model(tiny_family, folder, seed=TINY_MODEL_SEED)
    elif model == SEEING_MODEL:
        build_seeing_base(folder, **SEEING_BASE_RECIPE)
    else:
        raise ConfigError(f"{model!r} is not a built-in model; the built-in models are {', '.join(BUILTIN_MODELS)}")


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
    seed, steps, scenes = base["seed"], base["steps"], base["scenes"]
    return _built_once(
        seeing_base_dir(cache_root, base),
        lambda folder: build_seeing_base(folder, seed=seed, steps=steps, scenes=scenes),
    )


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


def starting_adapter(spec: JobSpec | PairGenerationCreate, *, job_id: str, store: ArtifactStore) -> Path:
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


def generative_files(store: ArtifactStore, dataset_id: str, role: str, *, labelled: bool = True) -> tuple[Path, Path]:
    """The generative evaluation set's (``labelled=False``: the prompt set's) JSONL file and vocabulary in dataset
    ``dataset_id``'s folder."""
    folder = _existing_dataset(store, dataset_id, role)
    found = find_generative_files(folder, labelled=labelled)
    if found is None:
        what = "image, prompt and objects" if labelled else "image and prompt"
        raise DatasetMissing(
            f"{role} dataset {dataset_id} is not a {'generative evaluation' if labelled else 'prompt'} set (a JSONL "
            f"file of {what} beside vocabulary.json)"
        )
    return found


def _built_in_model(model: str, trust_remote_code: bool, settings: Settings) -> Path | None:
    """Staging of the base model: a built-in model's folder, built on first use; None for a hub model (the engine
    downloads it). Refuses ``trust_remote_code`` unless the operator allows it: the worker is where it would run."""
    if trust_remote_code and not settings.allow_remote_code:
        raise ConfigError("trust_remote_code: not allowed on this service (DAMA_ALLOW_REMOTE_CODE is off)")
    tiny_family = TINY_MODELS.get(model)
    if tiny_family:
        return ensure_tiny_model(tiny_family, model_cache_root(settings))
    if model == SEEING_MODEL:
        return ensure_seeing_base(model_cache_root(settings))
    return None


def builtin_model_unbuilt(model: str, settings: Settings) -> bool:
    """Whether ``model`` is a built-in model this worker has not built yet (its run starts by building it)."""
    root = model_cache_root(settings)
    tiny_family = TINY_MODELS.get(model)
    if tiny_family:
        return not (root / "dama-tiny" / f"{tiny_family}-seed{TINY_MODEL_SEED}" / "config.json").is_file()
    return model == SEEING_MODEL and not (seeing_base_dir(root) / "config.json").is_file()


def _model_values(model: str, trust_remote_code: bool, model_path: Path | None) -> dict[str, Any]:
    return {
        "name_or_path": model if model_path is None else str(model_path),
        "public_name": model,  # what the adapter names as its base: the job's model, never the staged folder
        "trust_remote_code": trust_remote_code,
        # Built-in models: float32 everywhere, so CPU runs and GPU runs agree and bf16 rounding cannot swamp them.
        "precision": "auto" if model_path is None else "fp32",
    }


@dataclass(frozen=True)
class StagedInputs:
    """What a training job reads, on this worker's disk: made by :func:`stage_training_inputs`, the one step that
    touches the artifact store and the model cache."""

    model_path: Path | None  # a built-in model's folder; None: a hub model, loaded by name
    train: Path
    eval: Path | None = None
    generative: Path | None = None
    vocabulary: Path | None = None
    init_adapter: Path | None = None


def stage_training_inputs(spec: JobSpec, *, job_id: str, store: ArtifactStore, settings: Settings) -> StagedInputs:
    """Fetch the job's datasets from the artifact store (into scratch with S3), build a built-in base model and copy
    the starting adapter; raises :class:`DatasetMissing` or the engine's ``ConfigError``."""
    evaluation = spec.evaluation
    model_path = _built_in_model(spec.model, spec.trust_remote_code, settings)
    train = _existing_dataset(store, spec.dataset_id, "training")
    held_out = generative = vocabulary = None
    if evaluation is not None and evaluation.dataset_id:
        held_out = _existing_dataset(store, evaluation.dataset_id, "evaluation")
    if evaluation is not None and evaluation.generative_dataset_id:
        generative, vocabulary = generative_files(store, evaluation.generative_dataset_id, "generative")
    init_adapter = starting_adapter(spec, job_id=job_id, store=store) if spec.init_source is not None else None
    return StagedInputs(model_path, train, held_out, generative, vocabulary, init_adapter)


# The engine settings a job spec does not carry and the worker decides (JOB_SPEC_SOURCES names the others): what
# train_config sets, or, marked NotExposed, leaves at the engine's default.
WORKER_DECIDES: dict[str, dict[str, str | NotExposed]] = {
    "model": {
        "name_or_path": "the hub name, or a built-in model's staged folder",
        "precision": "auto for hub models, fp32 for built-in ones",
        "init_adapter": "the staged copy of init_adapter",
        "public_name": "the job's model name (a built-in model's name, never its staged folder)",
        "revision": NotExposed("a job names a model, not a hub revision"),
        "attn_implementation": NotExposed("the engine picks the model's best"),
    },
    "data": {
        "train": "the staged training dataset",
        "eval": "the staged held-out dataset",
        "format": "the format the upload was read as",
    },
    "lora": {"freeze_vision_tower": NotExposed("the vision tower is never trained (ARCHITECTURE.md)")},
    "evaluation": {
        "generative": "the staged generative set's JSONL file",
        "vocabulary": "the staged generative set's vocabulary",
        "enabled": NotExposed("evaluation runs whenever a held-out or generative set is given"),
        "max_pairs": NotExposed("a job evaluates on all its held-out pairs"),
    },
    "run": {
        "output_dir": "the job's run folder on the artifact store",
        "cache_dir": "the worker's shared cache of reference log-probs and hardness",
        "resume": "always: a re-queued job continues from its newest checkpoint",
        "log_every": NotExposed("every step is reported"),
        "distributed_timeout_s": NotExposed("the engine's default"),
        "threads": NotExposed("the worker's process environment (DAMA_TORCH_THREADS) sets it"),
    },
}

_UNSET = object()


def _spec_value(spec: JobSpec | EvaluationCreate, path: str) -> Any:
    """The spec's value at a dotted ``path``; _UNSET when a section on the way is absent (null)."""
    value: Any = spec
    for name in path.split("."):
        if value is None:
            return _UNSET
        value = getattr(value, name)
    return value


def train_config(
    spec: JobSpec, staged: StagedInputs, *, run_dir: Path, cache_dir: Path, dataset_format: str | None = None
) -> TrainConfig:
    """The engine config of one job: a pure function of the spec and what staging made (no file is read or
    written). Each knob comes from the spec through :data:`dama_settings.spec_sources.JOB_SPEC_SOURCES`; the rest
    is the worker's (:data:`WORKER_DECIDES`). Raises the engine's ``ConfigError`` for a combination it refuses."""
    values: dict[str, dict[str, Any]] = {section: {} for section in (*JOB_SPEC_SOURCES, *WORKER_DECIDES)}
    for section, sources in JOB_SPEC_SOURCES.items():
        for name, source in sources.items():
            if not isinstance(source, NotExposed) and (value := _spec_value(spec, source)) is not _UNSET:
                values[section][name] = value
    model, data, evaluation, run = values["model"], values["data"], values["evaluation"], values["run"]
    model.update(_model_values(spec.model, spec.trust_remote_code, staged.model_path))
    if staged.init_adapter is not None:
        model["init_adapter"] = str(staged.init_adapter)
    if TINY_MODELS.get(spec.model) and spec.hyperparameters.learning_rate == DEFAULT_LEARNING_RATE:
        values["optim"]["learning_rate"] = TINY_MODEL_LEARNING_RATE  # random weights, the spec left the LoRA default
    data.update(train=str(staged.train), format=dataset_format if dataset_format in ENGINE_FORMATS else "auto")
    if staged.eval is not None:
        data["eval"] = str(staged.eval)
        data.pop("eval_fraction", None)  # a held-out set is given: nothing is held out of the training pairs
    if staged.generative is not None:
        evaluation.update(generative=str(staged.generative), vocabulary=str(staged.vocabulary))
    run.update(output_dir=str(run_dir.resolve()), cache_dir=str(cache_dir), resume=True)
    return parse_config(values)


def build_train_config(
    spec: JobSpec,
    *,
    job_id: str,
    store: ArtifactStore,
    settings: Settings,
    dataset_format: str | None = None,
) -> TrainConfig:
    """Stage, then translate: :func:`stage_training_inputs` and :func:`train_config` for one job of this worker."""
    staged = stage_training_inputs(spec, job_id=job_id, store=store, settings=settings)
    return train_config(
        spec,
        staged,
        run_dir=store.run_dir(job_id),
        cache_dir=settings.resolved_scratch_dir / "cache",
        dataset_format=dataset_format,
    )


def model_section(spec: JobSpec, settings: Settings) -> ModelSection:
    """The base model of a training job as the engine loads it (a built-in tiny model: its built folder)."""
    model_path = _built_in_model(spec.model, spec.trust_remote_code, settings)
    return ModelSection(**_model_values(spec.model, spec.trust_remote_code, model_path))


def adapter_folder(store: ArtifactStore, job_id: str) -> Path:
    """Where a training job's exported adapter lives on the workers."""
    return store.run_dir(job_id) / "adapter"


@dataclass(frozen=True)
class StagedEvaluation:
    """What an evaluation job reads, on this worker's disk (:func:`stage_evaluation_inputs`)."""

    model_path: Path | None
    preference: Path | None = None
    generative: Path | None = None
    vocabulary: Path | None = None
    adapter: Path | None = None


def stage_evaluation_inputs(spec: EvaluationCreate, *, store: ArtifactStore, settings: Settings) -> StagedEvaluation:
    """Fetch the evaluation's datasets and the tuned adapter, build a built-in base model (raises
    :class:`DatasetMissing`, :class:`AdapterMissing` or the engine's ``ConfigError``)."""
    model_path = _built_in_model(spec.model, spec.trust_remote_code, settings)
    preference = generative = vocabulary = adapter = None
    if spec.preference_dataset_id:
        preference = _existing_dataset(store, spec.preference_dataset_id, "preference")
    if spec.generative_dataset_id:
        generative, vocabulary = generative_files(store, spec.generative_dataset_id, "generative")
    if spec.adapter_job_id:
        folder = adapter_folder(store, spec.adapter_job_id)
        store.fetch(folder)
        if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise AdapterMissing(
                f"adapter_job_id: job {spec.adapter_job_id} has no adapter on the workers' artifact store ({folder})"
            )
        adapter = folder.resolve()
    return StagedEvaluation(model_path, preference, generative, vocabulary, adapter)


# The evaluation settings an evaluation request does not carry and the worker decides
# (dama_settings.spec_sources.EVALUATION_SPEC_SOURCES names the others), by dotted path in the engine's config.
EVALUATION_WORKER_DECIDES: dict[str, str | NotExposed] = {
    "model.name_or_path": "the hub name, or a built-in model's staged folder",
    "model.precision": "auto for hub models, fp32 for built-in ones",
    "model.revision": NotExposed("a request names a model, not a hub revision"),
    "model.attn_implementation": NotExposed("the engine picks the model's best"),
    "model.init_adapter": NotExposed("the tuned adapter is compared with the plain base model"),
    "model.public_name": "the request's model name (a built-in model's name, never its staged folder)",
    "adapter": "the staged tuned adapter of adapter_job_id",
    "adapter_name": "the adapter's training job (adapter_job_id), never the folder it was staged in",
    "data.preference": "the staged preference dataset",
    "data.format": "the format the preference upload was read as",
    "data.generative": "the staged generative set's JSONL file",
    "data.vocabulary": "the staged generative set's vocabulary",
    "device": NotExposed("the worker's own device (auto: CUDA when available)"),
    "output_dir": "the evaluation job's run folder",
}


def evaluation_config(
    spec: EvaluationCreate, staged: StagedEvaluation, *, run_dir: Path, preference_format: str | None = None
) -> EvaluationConfig:
    """The engine config of one evaluation job: a pure function of the request and what staging made. Each knob
    comes from the request through :data:`dama_settings.spec_sources.EVALUATION_SPEC_SOURCES`; the rest is the
    worker's (:data:`EVALUATION_WORKER_DECIDES`)."""
    values: dict[str, Any] = {"model": {}, "data": {}, "generation": {}}
    for path, source in EVALUATION_SPEC_SOURCES.items():
        if not isinstance(source, NotExposed):
            *section, name = path.split(".")
            (values.setdefault(section[0], {}) if section else values)[name] = _spec_value(spec, source)
    values["model"].update(_model_values(spec.model, spec.trust_remote_code, staged.model_path))
    data = values["data"]
    if staged.preference is not None:
        data["preference"] = str(staged.preference)
        data["format"] = preference_format if preference_format in ENGINE_FORMATS else "auto"
    if staged.generative is not None:
        data.update(generative=str(staged.generative), vocabulary=str(staged.vocabulary))
    values["adapter"] = str(staged.adapter) if staged.adapter is not None else None
    values["adapter_name"] = f"adapter of {spec.adapter_job_id}" if spec.adapter_job_id else None
    values["output_dir"] = str(run_dir.resolve())
    return parse_evaluation_config(values)


def evaluation_passes(spec: dict[str, Any]) -> int:
    """How many model passes an evaluation job makes (log-probs and generation, once per model): its progress unit."""
    models = 2 if spec.get("adapter_job_id") else 1
    sets = int(bool(spec.get("preference_dataset_id"))) + int(bool(spec.get("generative_dataset_id")))
    return max(1, models * sets)


@dataclass(frozen=True)
class StagedPairs:
    """What a pair generation reads, on this worker's disk (:func:`stage_pair_inputs`)."""

    model_path: Path | None
    generative: Path
    vocabulary: Path
    init_adapter: Path | None = None
    judge: dict[str, Any] | None = None  # the engine's judge config (its key from this worker's environment)
    judge_address: str | None = None  # the judge host's address, checked against the policy: connect there


def stage_pair_inputs(
    spec: PairGenerationCreate, *, job_id: str, store: ArtifactStore, settings: Settings
) -> StagedPairs:
    """Fetch the generative set (or prompt set), build a built-in base model, copy the starting adapter, and for a
    judge, resolve its host once and check the address (raises :class:`DatasetMissing` or the engine's
    ``ConfigError``)."""
    judge, judge_address = judge_target(spec.judge, settings) if spec.judge is not None else (None, None)
    model_path = _built_in_model(spec.model, spec.trust_remote_code, settings)
    generative, vocabulary = generative_files(
        store, spec.generative_dataset_id, "generative", labelled=spec.judge is None
    )
    init_adapter = starting_adapter(spec, job_id=job_id, store=store) if spec.init_source is not None else None
    return StagedPairs(model_path, generative, vocabulary, init_adapter, judge, judge_address)


def judge_target(name: str, settings: Settings) -> tuple[dict[str, Any], str]:
    """A judge target's engine config and the address to reach it at: its host resolved once, every address
    checked against the webhooks' policy with ``DAMA_JUDGE_ALLOWED_HOSTS`` (:mod:`jobstore.judges`)."""
    target = settings.judge_targets.get(name)
    if target is None:
        raise ConfigError(f"judge: {name!r} is no longer a judge of this service (DAMA_JUDGE_TARGETS)")
    parts = urlsplit(target.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        address = pinned_address(
            (parts.hostname or "").lower(),
            port,
            allowed_hosts=settings.allowed_judge_hosts,
            setting="DAMA_JUDGE_ALLOWED_HOSTS",
        )
    except RefusedTarget as error:
        # The tenant's message names no host or address (the operator's judge may be internal); the log does.
        log.warning("judge %r (%s) cannot be used: %s", name, target.url, error)
        raise ConfigError(
            f"judge {name!r} cannot be reached from this service's workers (the operator's worker log says why)"
        ) from None
    return target.engine_values(name), address


def pairs_output_dir(store: ArtifactStore, job_id: str) -> Path:
    """Where a pair generation writes its output (the dataset, samples.jsonl, report.json and report.png)."""
    return store.run_dir(job_id) / "pairs"


def pairs_config(spec: PairGenerationCreate, staged: StagedPairs, *, output_dir: Path) -> PairsConfig:
    """The engine config of one pair generation: a pure function of the request and what staging made."""
    model = _model_values(spec.model, spec.trust_remote_code, staged.model_path)
    if staged.init_adapter is not None:
        model["init_adapter"] = str(staged.init_adapter)
    values: dict[str, Any] = {
        "model": model,
        "data": {
            "generative": str(staged.generative),
            "vocabulary": str(staged.vocabulary),
            "max_prompts": spec.max_prompts,
        },
        "generation": {
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "max_new_tokens": spec.max_new_tokens,
            "seed": spec.seed,
        },
        "sampling": {"samples_per_prompt": spec.samples_per_prompt, "prompts_per_batch": spec.prompts_per_batch},
        "judge": staged.judge,
        "output_dir": str(output_dir.resolve()),
    }
    return parse_pairs_config(values)
