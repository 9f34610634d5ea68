"""Where each engine setting comes from in a job spec: the one table the worker translates a spec with.

Per section of the engine's training config (``dama_engine.config.TrainConfig``), every setting of
:mod:`dama_settings.knobs` that a job could set is named here, with either the dotted path of the job-spec field
that sets it (``jobstore.spec.JobSpec``; a path through a section the spec left out, such as ``evaluation.*``
without an evaluation, sets nothing and the engine's default holds) or :class:`NotExposed` with the reason a job
cannot set it. A setting added to the engine without an entry fails ``tests/worker/test_spec_translation.py``
instead of being silently dropped by the service.

The settings the worker decides (paths, where the run writes, resume, the data format the upload was read as, the
precision of a built-in model) are named in ``worker.engine_config.WORKER_DECIDES``; each engine setting is in
exactly one of the two tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NotExposed:
    """A setting a job spec cannot set: the engine's default holds on the service."""

    reason: str


_ENGINE_DETAIL = NotExposed("an engine detail with a sound default; the command line sets it for research runs")

JOB_SPEC_SOURCES: dict[str, dict[str, str | NotExposed]] = {
    "objective": {
        "method": "method",
        "beta": "hyperparameters.beta",
        "keep_ratio": "hyperparameters.keep_ratio",
        "gamma": "hyperparameters.gamma",
        "beta_min": _ENGINE_DETAIL,
        "beta_max": _ENGINE_DETAIL,
        "filter_std": "hyperparameters.filter_std",
        "filter_sigma": "hyperparameters.filter_sigma",
        "ema_source": "hyperparameters.ema_source",
        "beta_dpo_a": _ENGINE_DETAIL,
        "filter_scope": "hyperparameters.filter_scope",
    },
    "hardness": {
        "scorer": "hardness_scorer",
        "aggregation": _ENGINE_DETAIL,
        "splitter": _ENGINE_DETAIL,
        "batch_size": NotExposed("a throughput knob of the worker's CLIP pass, not of the job"),
        "rescale": "hardness_rescale",
    },
    "optim": {
        "learning_rate": "hyperparameters.learning_rate",
        "weight_decay": "hyperparameters.weight_decay",
        "warmup_ratio": "hyperparameters.warmup_ratio",
        "scheduler": _ENGINE_DETAIL,
        "max_grad_norm": _ENGINE_DETAIL,
        "epochs": "hyperparameters.epochs",
        "max_steps": "hyperparameters.max_steps",
        "batch_size": "hyperparameters.batch_size",
        "grad_accumulation": "hyperparameters.grad_accumulation",
        "gradient_checkpointing": "hyperparameters.gradient_checkpointing",
        "pair_forward": NotExposed("auto picks the fastest forward the model takes; the others are for benchmarks"),
        "compile": "hyperparameters.compile",
        "seed": "hyperparameters.seed",
    },
    "data": {
        "max_length": "hyperparameters.max_length",
        "max_pixels": "hyperparameters.max_pixels",
        "min_pixels": "hyperparameters.min_pixels",
        "max_image_side": "hyperparameters.max_image_side",
        "eval_fraction": "evaluation.holdout_fraction",
        "truncate_answers": NotExposed("the service rejects over-long rows with their row numbers, never cuts them"),
        "skip_invalid_rows": NotExposed("an upload is checked whole before it is stored: no invalid rows reach a job"),
    },
    "model": {
        "trust_remote_code": "trust_remote_code",
    },
    "lora": {
        "enabled": "lora.enabled",
        "r": "lora.r",
        "alpha": "lora.alpha",
        "dropout": "lora.dropout",
        "target_modules": "lora.target_modules",
        "train_projector": "lora.train_projector",
    },
    "run": {
        "checkpoint_every": "hyperparameters.checkpoint_every",
        "keep_checkpoints": "hyperparameters.keep_checkpoints",
        "eval_every": "hyperparameters.eval_every",
    },
    "evaluation": {
        "max_new_tokens": "evaluation.max_new_tokens",
        "max_samples": "evaluation.max_samples",
        "pope": "evaluation.pope",
    },
    "distributed": {
        "strategy": "strategy",
    },
}


# Where each setting of the engine's evaluation config (``dama_engine.evaluation.EvaluationConfig``) comes from in
# an evaluation request (``jobstore.spec.EvaluationCreate``), keyed by the setting's dotted path in that config
# (``data.max_pairs``; a top-level setting by its name). The settings the worker decides are named in
# ``worker.engine_config.EVALUATION_WORKER_DECIDES``; each setting is in exactly one of the two tables
# (tests/worker/test_spec_translation.py).
_CHECKED_UPLOADS = NotExposed(
    "an upload is checked whole before it is stored: no invalid or over-long rows reach a job"
)

EVALUATION_SPEC_SOURCES: dict[str, str | NotExposed] = {
    "model.trust_remote_code": "trust_remote_code",
    "data.max_pairs": "max_pairs",
    "data.max_samples": "max_samples",
    "data.max_length": "max_length",
    "data.truncate_answers": _CHECKED_UPLOADS,
    "data.skip_invalid_rows": _CHECKED_UPLOADS,
    "generation.max_new_tokens": "generation.max_new_tokens",
    "generation.temperature": "generation.temperature",
    "generation.top_p": NotExposed("an evaluation decodes greedily or at one temperature: comparable across runs"),
    "generation.top_k": NotExposed("an evaluation decodes greedily or at one temperature: comparable across runs"),
    "generation.seed": NotExposed("the engine's fixed sampling seed keeps evaluations reproducible"),
    "hardness.scorer": NotExposed("pairs are bucketed by the hardness they carry; the service runs no CLIP scorer"),
    "hardness.aggregation": _ENGINE_DETAIL,
    "hardness.splitter": _ENGINE_DETAIL,
    "hardness.batch_size": NotExposed("a throughput knob of the worker's CLIP pass, not of the job"),
    "hardness.rescale": _ENGINE_DETAIL,
    "hardness.thresholds": NotExposed("buckets are the data's tertiles, the same for every evaluation"),
    "judge": NotExposed("the service configures no judge endpoint; CHAIR and the preference scores are reported"),
    "pope.enabled": "pope",
    "pope.per_image": NotExposed("fixed (3 present, 3 absent per split, POPE's own design): comparable across runs"),
    "pope.seed": NotExposed("a fixed seed draws the same questions in every evaluation of a set"),
    "pope.max_new_tokens": NotExposed("a yes or no needs few tokens; the engine's cap keeps answers short"),
    "beta": "beta",
    "batch_size": "batch_size",
}
