"""Evaluating a tuned model against its base: object hallucination (CHAIR) and held-out preference metrics.

shared/DAMA.md section 7 reports Object HalBench's CHAIRs / CHAIRi and AMBER's CHAIR, Cover and Hal. This module
computes those metrics with a vocabulary the user supplies, and the implicit-reward preference metrics of section 3
split by data hardness (section 1). :func:`run_evaluation` runs both for the base model and the tuned one.

**Tuned from a starting adapter** (``model.init_adapter``, shared/DAMA.md section 4b): the model the tuned one is
compared against (``base``, the reference of its implicit rewards) is base + that adapter, the model its training
started from; the plain base model is reported as well, as ``plain_base`` beside ``base`` and ``tuned``.

The vocabulary, the matcher, :func:`chair` and the generative eval set loader live in the torch-free
:mod:`dama_engine.chair` (its docstring has the file formats, the matching rules and the CHAIR definitions);
this module re-exports them.

**Preference metrics** (:func:`preference_metrics`): DPO loss, accuracy and reward margin with the base beta
(section 3), overall and per hardness bucket: ``hard`` when ``delta < low``, ``easy`` when ``delta > high``,
``medium`` otherwise (section 1: larger delta = easier pair), with ``(low, high)`` given or, by default, the
tertiles of the data's delta (linear interpolation between order statistics).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dama_engine.callbacks import Callback

# The torch-free half of the evaluation, re-exported: its names are part of this module's interface.
from dama_engine.chair import ChairSample as ChairSample
from dama_engine.chair import GenerativeEvalError as GenerativeEvalError
from dama_engine.chair import GenerativeEvalSet as GenerativeEvalSet
from dama_engine.chair import GenerativeSample as GenerativeSample
from dama_engine.chair import Vocabulary as Vocabulary
from dama_engine.chair import VocabularyError as VocabularyError
from dama_engine.chair import VocabularyLike as VocabularyLike
from dama_engine.chair import as_vocabulary as as_vocabulary
from dama_engine.chair import chair as chair
from dama_engine.chair import chair_samples as chair_samples
from dama_engine.chair import judge_response as judge_response
from dama_engine.chair import load_generative_eval as load_generative_eval
from dama_engine.chair import normalize_name as normalize_name
from dama_engine.chair import plural_forms as plural_forms
from dama_engine.chair import summarize_chair as summarize_chair
from dama_engine.config import ConfigError, ModelSection, TrainConfig, apply_overrides, read_yaml_mapping
from dama_engine.data.formats import load_and_validate
from dama_engine.data.rows import PreferenceRow
from dama_engine.data.validation import DataError
from dama_engine.generation import GenerationRequest, GenerationSettings, generate
from dama_engine.hardness import DEFAULT_SCORER, HardnessConfig, compute_hardness, user_hardness
from dama_engine.judge import JudgeConfig, judge_answers
from dama_engine.objective import ObjectiveConfig, preference_loss
from dama_settings.knobs import HARDNESS
from dama_settings.names import Aggregation, HardnessRescale

BUCKETS: tuple[str, ...] = ("easy", "medium", "hard")
EVAL_STAGES: tuple[str, ...] = (
    "validating",
    "loading_model",
    "scoring",
    "log_probs",
    "generating",
    "judging",  # only with a judge configured
    "writing",
)
"""Stages :func:`run_evaluation` reports through ``Callback.on_stage``; ``log_probs`` and ``generating`` run once per
model (``info["model"]`` is ``"base"``, ``"tuned"``, or ``"plain_base"`` with ``model.init_adapter``) and report
``on_progress`` under the same stage name."""


# ---------------------------------------------------------------------------------------------------------------
# Preference metrics by hardness bucket

FloatsLike = torch.Tensor | Sequence[float]


@dataclass(frozen=True)
class HardnessBuckets:
    """Each pair's bucket (``easy`` / ``medium`` / ``hard``) and the thresholds that made them."""

    labels: tuple[str, ...]
    low: float
    high: float
    source: Literal["tertiles", "given"]

    def members(self, bucket: str) -> list[int]:
        return [index for index, label in enumerate(self.labels) if label == bucket]

    def counts(self) -> dict[str, int]:
        return {bucket: self.labels.count(bucket) for bucket in BUCKETS}

    def describe(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "thresholds_source": self.source,
            "rule": "hard: delta < low; medium: low <= delta <= high; easy: delta > high",
            "counts": self.counts(),
        }


def _as_float64(values: FloatsLike, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return tensor


def bucket_by_hardness(delta: FloatsLike, thresholds: tuple[float, float] | None = None) -> HardnessBuckets:
    """Put each pair in ``hard`` (delta < low), ``medium`` or ``easy`` (delta > high) (shared/DAMA.md section 1).

    Args:
        delta: (N,) per-pair data hardness ``delta_i``; larger is easier.
        thresholds: ``(low, high)`` with ``low <= high``; default: the 1/3 and 2/3 quantiles of ``delta``.
    """
    values = _as_float64(delta, "delta")
    if values.numel() == 0:
        raise ValueError("bucket_by_hardness: no pairs")
    if thresholds is None:
        low, high = (float(q) for q in torch.quantile(values, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)))
        source: Literal["tertiles", "given"] = "tertiles"
    else:
        low, high = float(thresholds[0]), float(thresholds[1])
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"hardness thresholds must be finite with low <= high, got {thresholds}")
        source = "given"
    labels = tuple("hard" if value < low else "easy" if value > high else "medium" for value in values.tolist())
    return HardnessBuckets(labels=labels, low=low, high=high, source=source)


def _buckets(
    hardness: FloatsLike | HardnessBuckets | None, thresholds: tuple[float, float] | None, n: int
) -> HardnessBuckets | None:
    if hardness is None:
        return None
    if isinstance(hardness, HardnessBuckets):
        if thresholds is not None:
            raise ValueError("give thresholds or ready-made HardnessBuckets, not both")
        buckets = hardness
    else:
        buckets = bucket_by_hardness(hardness, thresholds)
    if len(buckets.labels) != n:
        raise ValueError(f"hardness has {len(buckets.labels)} values for {n} pairs")
    return buckets


def _dpo_block(logps: Sequence[torch.Tensor], beta: float) -> dict[str, float | None]:
    """One block of :func:`preference_metrics`; ``logps`` are policy chosen/rejected, reference chosen/rejected."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
    count = int(policy_chosen.numel())
    if count == 0:
        keys = ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected")
        return {"count": 0, **dict.fromkeys(keys)}
    # Plain DPO with the base beta, as held-out evaluation during training does (DAMA.md section 3).
    metrics = preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        config=ObjectiveConfig(method="dpo", beta=beta),
    ).metrics
    return {
        "count": count,
        "loss": metrics["loss"],
        "accuracy": metrics["reward_accuracy"],
        "margin": metrics["reward_margin"],
        "rewards_chosen": metrics["rewards_chosen"],
        "rewards_rejected": metrics["rewards_rejected"],
    }


def preference_metrics(
    policy_chosen: FloatsLike,
    policy_rejected: FloatsLike,
    ref_chosen: FloatsLike,
    ref_rejected: FloatsLike,
    beta: float,
    hardness: FloatsLike | HardnessBuckets | None = None,
    thresholds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Held-out DPO loss, preference accuracy and reward margin, overall and per hardness bucket.

    With ``R_i`` the implicit reward gap of shared/DAMA.md (notation): ``loss = mean -log sigma(beta R_i)``,
    ``margin = mean beta R_i``, ``accuracy = share of R_i > 0``; rewards as in section 3.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (N,) summed log-probs of each pair's answers
            under the policy (tuned) and the reference (base) model.
        beta: the base beta.
        hardness: (N,) per-pair ``delta_i`` (or :class:`HardnessBuckets`); omitted: no buckets.
        thresholds: ``(low, high)`` for :func:`bucket_by_hardness`; default: the tertiles of ``hardness``.

    Returns:
        ``{"overall": block, "buckets": {"easy": block, "medium": block, "hard": block} | None,
        "thresholds": {...} | None}``; a block has ``count, loss, accuracy, margin, rewards_chosen,
        rewards_rejected`` (None in an empty bucket).
    """
    tensors = [
        _as_float64(values, name)
        for values, name in (
            (policy_chosen, "policy_chosen"),
            (policy_rejected, "policy_rejected"),
            (ref_chosen, "ref_chosen"),
            (ref_rejected, "ref_rejected"),
        )
    ]
    n = tensors[0].numel()
    if any(tensor.numel() != n for tensor in tensors):
        raise ValueError("preference_metrics: the four log-prob tensors must have the same length")
    if n == 0:
        raise ValueError("preference_metrics: no pairs")
    buckets = _buckets(hardness, thresholds, n)
    result: dict[str, Any] = {"overall": _dpo_block(tensors, beta), "buckets": None, "thresholds": None}
    if buckets is not None:
        result["buckets"] = {
            bucket: _dpo_block([tensor[buckets.members(bucket)] for tensor in tensors], beta) for bucket in BUCKETS
        }
        result["thresholds"] = buckets.describe()
    return result


def _logprob_block(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float | None]:
    count = int(chosen.numel())
    if count == 0:
        return {"count": 0, **dict.fromkeys(("logp_chosen", "logp_rejected", "logp_margin", "logp_accuracy"))}
    return {
        "count": count,
        "logp_chosen": float(chosen.mean()),
        "logp_rejected": float(rejected.mean()),
        "logp_margin": float((chosen - rejected).mean()),
        "logp_accuracy": float((chosen > rejected).double().mean()),
    }


def logprob_stats(
    chosen: FloatsLike,
    rejected: FloatsLike,
    hardness: FloatsLike | HardnessBuckets | None = None,
    thresholds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One model's own view of the pairs, without a reference: mean summed log-probs of the chosen and rejected
    answers, their mean difference, and ``logp_accuracy`` (share of pairs whose chosen answer is the likelier).

    Summed log-probs favour shorter answers, so compare models on the same pairs, not pairs with each other.
    Buckets as in :func:`preference_metrics`.
    """
    chosen_t, rejected_t = _as_float64(chosen, "chosen"), _as_float64(rejected, "rejected")
    if chosen_t.numel() != rejected_t.numel():
        raise ValueError("logprob_stats: chosen and rejected must have the same length")
    buckets = _buckets(hardness, thresholds, chosen_t.numel())
    result: dict[str, Any] = {"overall": _logprob_block(chosen_t, rejected_t), "buckets": None}
    if buckets is not None:
        result["buckets"] = {
            bucket: _logprob_block(chosen_t[buckets.members(bucket)], rejected_t[buckets.members(bucket)])
            for bucket in BUCKETS
        }
    return result


# ---------------------------------------------------------------------------------------------------------------
# Configuration


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EvalDataSection(_Section):
    preference: str | None = Field(
        default=None, description="Held-out preference pairs: a file, folder or archive in any dama-train format."
    )
    format: Literal["auto", "trl", "rlaif_v", "openai"] = "auto"
    generative: str | None = Field(default=None, description="Generative eval JSONL (image, prompt, objects).")
    vocabulary: str | None = Field(default=None, description="Vocabulary JSON for CHAIR (needed with generative).")
    max_pairs: int | None = Field(default=None, gt=0, description="Use only the first N preference pairs.")
    max_samples: int | None = Field(default=None, gt=0, description="Use only the first N generative samples.")
    max_length: int = Field(default=2048, gt=0, description="Tokens per scored sequence, image tokens included.")
    truncate_answers: bool = False
    skip_invalid_rows: bool = Field(default=False, description="Leave out bad or over-long pairs instead of stopping.")


class EvalHardnessSection(_Section):
    scorer: str | None = Field(
        default=None,
        description="CLIP model scoring pairs that carry no hardness scores; none: no buckets for such data.",
    )
    aggregation: Aggregation = HARDNESS["aggregation"].field()
    rescale: HardnessRescale = HARDNESS["rescale"].field()
    thresholds: tuple[float, float] | None = Field(
        default=None, description="(low, high) bucket thresholds on delta; default: the data's tertiles."
    )

    @model_validator(mode="after")
    def _ordered(self) -> EvalHardnessSection:
        if self.thresholds is not None and self.thresholds[0] > self.thresholds[1]:
            raise ValueError("hardness.thresholds must be [low, high] with low <= high")
        return self


class EvaluationConfig(_Section):
    """One evaluation run: the base model, the tuned adapter (optional), the data and how to decode.

    ``model.init_adapter``: the PEFT adapter the tuned one was trained from; the tuned adapter is then compared
    against base + that adapter (``base``), and the plain base model is reported as ``plain_base``."""

    model: ModelSection
    adapter: str | None = Field(
        default=None,
        description="The tuned model: a PEFT adapter folder (dama-train's OUTPUT/adapter) or a full model folder.",
    )
    data: EvalDataSection = EvalDataSection()
    generation: GenerationSettings = GenerationSettings()
    hardness: EvalHardnessSection = EvalHardnessSection()
    judge: JudgeConfig | None = Field(
        default=None, description="Optional OpenAI-compatible judge of generative answers (MMHal-style 0-6)."
    )
    beta: float = Field(default=0.1, gt=0, description="The base beta of the implicit rewards (DAMA.md section 3).")
    batch_size: int = Field(default=8, gt=0, description="Pairs per scoring pass and prompts per generation batch.")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda or cuda:N.")
    output_dir: str = "runs/eval"

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationConfig:
        data = self.data
        if data.preference is None and data.generative is None:
            raise ValueError("give data.preference and/or data.generative: there is nothing to evaluate")
        if data.generative is not None and data.vocabulary is None:
            raise ValueError("data.generative needs data.vocabulary (object names and synonyms for CHAIR)")
        if data.vocabulary is not None and data.generative is None:
            raise ValueError("data.vocabulary is set but data.generative is not; give both or neither")
        return self


def parse_evaluation_config(values: dict[str, Any]) -> EvaluationConfig:
    try:
        return EvaluationConfig.model_validate(values)
    except ValidationError as error:
        lines = [f"{'.'.join(str(p) for p in item['loc']) or 'config'}: {item['msg']}" for item in error.errors()]
        raise ConfigError("invalid evaluation config:\n  " + "\n  ".join(lines)) from None


def load_evaluation_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> EvaluationConfig:
    """Read a YAML evaluation config, apply ``key=value`` / ``section.key=value`` overrides, validate."""
    values = read_yaml_mapping(path) if path is not None else {}
    return parse_evaluation_config(apply_overrides(values, overrides))


# ---------------------------------------------------------------------------------------------------------------
# The run: base vs tuned


@dataclass
class EvaluationResult:
    output_dir: Path
    results: dict[str, Any]
    results_path: Path
    chart_path: Path
    generations_path: Path | None = None
    pairs_path: Path | None = None
    seconds: float = 0.0
    generations: list[dict[str, Any]] = field(default_factory=list)  # the records of generations.jsonl


TUNED_ADAPTER, START_ADAPTER = "default", "start"  # the tuned adapter keeps peft's default name


@dataclass
class _Models:
    """The base and the tuned model; with a PEFT adapter they are one model, the base being its adapter off. With a
    starting adapter (``start``) that one model holds both adapters: ``base`` is the starting one switched on,
    ``plain_base`` every adapter off."""

    base: Any
    tuned: Any = None  # None: no adapter given
    peft: bool = False
    start: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The models to evaluate, in order."""
        if self.tuned is None:
            return ("base",)
        return ("plain_base", "base", "tuned") if self.start else ("base", "tuned")

    @contextlib.contextmanager
    def use(self, which: str) -> Iterator[Any]:
        if self.start and which != "plain_base":
            self.tuned.set_adapter(TUNED_ADAPTER if which == "tuned" else START_ADAPTER, inference_mode=True)
            try:
                yield self.tuned
            finally:
                self.tuned.set_adapter(TUNED_ADAPTER, inference_mode=True)
        elif which == "tuned":
            yield self.tuned
        elif self.peft:
            with self.tuned.disable_adapter():
                yield self.tuned
        else:
            yield self.base


@dataclass
class _Inputs:
    rows: list[PreferenceRow] = field(default_factory=list)
    generative: GenerativeEvalSet | None = None
    adapter_kind: Literal["peft", "full"] | None = None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but no CUDA device is available; use device=auto or cpu")
    return device


def _validate_inputs(config: EvaluationConfig, preference_rows: Sequence[PreferenceRow] | None = None) -> _Inputs:
    """Read and check everything before a model is loaded, so bad input fails in seconds. ``preference_rows``:
    pairs already loaded (a training run's held-out split) in place of reading ``data.preference``."""
    inputs = _Inputs()
    if config.adapter is not None:
        adapter = Path(config.adapter)
        if (adapter / "adapter_config.json").is_file():
            inputs.adapter_kind = "peft"
        elif (adapter / "config.json").is_file():
            inputs.adapter_kind = "full"
        else:
            raise ConfigError(
                f"adapter: {adapter} holds neither adapter_config.json (a PEFT adapter) nor config.json (a full model)"
            )
    start = config.model.init_adapter
    if start is not None:
        if inputs.adapter_kind != "peft":
            raise ConfigError(
                "model.init_adapter: the adapter the tuned one started from needs the tuned one as a PEFT adapter "
                "(adapter: a folder with adapter_config.json)"
            )
        if not (Path(start) / "adapter_config.json").is_file():
            raise ConfigError(f"model.init_adapter: {start} holds no adapter_config.json (a PEFT adapter)")
    data = config.data
    if preference_rows is not None or data.preference is not None:
        rows = list(preference_rows) if preference_rows is not None else _read_preference(config)
        inputs.rows = rows[: data.max_pairs] if data.max_pairs else rows
        if not inputs.rows:
            raise DataError("data.preference: no usable pairs")
    if data.generative is not None:
        assert data.vocabulary is not None
        loaded = load_generative_eval(data.generative, data.vocabulary)
        if data.max_samples:
            loaded.samples = loaded.samples[: data.max_samples]
        inputs.generative = loaded
    return inputs


def _read_preference(config: EvaluationConfig) -> list[PreferenceRow]:
    data = config.data
    assert data.preference is not None
    rows, report = load_and_validate(data.preference, format=data.format)
    if not report.ok and not data.skip_invalid_rows:
        raise DataError(
            f"data.preference: {len(report.errors)} invalid rows (set data.skip_invalid_rows=true to leave them "
            f"out)\n{report}",
            report.to_dict()["errors"],
        )
    return rows


def _load_models(config: EvaluationConfig, inputs: _Inputs, device: torch.device, dtype: torch.dtype) -> _Models:
    from peft import PeftModel

    from dama_engine.models import load_model

    base = load_model(config.model, dtype=dtype).to(device).eval()
    if config.adapter is None:
        return _Models(base=base)
    if inputs.adapter_kind == "peft":
        # The adapter is injected into the base's layers: the base is this model with the adapter disabled.
        tuned = PeftModel.from_pretrained(base, config.adapter, adapter_name=TUNED_ADAPTER)
        start = config.model.init_adapter
        if start is not None:  # the starting adapter beside it, in the same layers
            tuned.load_adapter(start, adapter_name=START_ADAPTER)
            tuned.set_adapter(TUNED_ADAPTER, inference_mode=True)
        return _Models(base=base, tuned=tuned.to(device).eval(), peft=True, start=start is not None)
    full = config.model.model_copy(update={"name_or_path": config.adapter, "revision": None})
    return _Models(base=base, tuned=load_model(full, dtype=dtype).to(device).eval())


def _preference_hardness(
    config: EvaluationConfig, rows: list[PreferenceRow], device: torch.device, callback: Callback
) -> tuple[torch.Tensor | None, str | None]:
    section = config.hardness
    try:
        supplied = user_hardness(rows) is not None
    except ValueError as error:
        raise DataError(f"data.preference: {error}") from None
    if not supplied and section.scorer is None:
        return None, None
    if not supplied:
        callback.on_stage("scoring", {"pairs": len(rows), "scorer": section.scorer})
    # User scores (rescaled as configured) or CLIP with the configured aggregation: delta as training sees it.
    result = compute_hardness(
        rows,
        HardnessConfig(
            scorer=section.scorer or DEFAULT_SCORER,
            aggregation=section.aggregation,
            rescale=section.rescale,
            device=str(device),
        ),
        progress=lambda done, total: callback.on_progress("scoring", done, total),
    )
    return result.delta, result.source


def _evaluate_preference(
    config: EvaluationConfig,
    rows: list[PreferenceRow],
    models: _Models,
    processor: Any,
    device: torch.device,
    bf16: bool,
    callback: Callback,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from dama_engine.batching import PairEncoder
    from dama_engine.trainer import _check_lengths, _pair_log_probs_all

    encoder = PairEncoder(processor, max_length=config.data.max_length, truncate_answers=config.data.truncate_answers)
    usable = _check_lengths(encoder, rows, "preference", config.data.skip_invalid_rows)
    if not usable:
        raise DataError("data.preference: no pair fits data.max_length")
    delta, source = _preference_hardness(config, usable, device, callback)
    buckets = bucket_by_hardness(delta, config.hardness.thresholds) if delta is not None else None

    log_probs: dict[str, torch.Tensor] = {}
    for which in models.names:
        callback.on_stage("log_probs", {"model": which, "pairs": len(usable)})
        with models.use(which) as model:
            log_probs[which] = _pair_log_probs_all(
                model,
                encoder,
                usable,
                config.batch_size,
                device,
                bf16,
                progress=lambda done, total: callback.on_progress("log_probs", done, total),
            ).double()

    base, tuned = log_probs["base"], log_probs.get("tuned")
    section: dict[str, Any] = {
        "data": config.data.preference,
        "pairs": len(usable),
        "skipped": len(rows) - len(usable),
        "hardness": None if buckets is None else {"source": source, **buckets.describe()},  # source of delta
        "base": logprob_stats(base[:, 0], base[:, 1], buckets),
        "tuned": None if tuned is None else logprob_stats(tuned[:, 0], tuned[:, 1], buckets),
        "implicit_reward": None,
    }
    if "plain_base" in log_probs:  # tuned from a starting adapter: base is base + that adapter
        plain = log_probs["plain_base"]
        section["plain_base"] = logprob_stats(plain[:, 0], plain[:, 1], buckets)
    if tuned is not None:
        section["implicit_reward"] = preference_metrics(
            tuned[:, 0], tuned[:, 1], base[:, 0], base[:, 1], config.beta, buckets
        )
    per_pair = []
    for index, row in enumerate(usable):
        record: dict[str, Any] = {
            "id": row.row_id,
            "hardness": None if delta is None else float(delta[index]),
            "bucket": None if buckets is None else buckets.labels[index],
            "base_logp_chosen": float(base[index, 0]),
            "base_logp_rejected": float(base[index, 1]),
        }
        if "plain_base" in log_probs:
            record.update(
                plain_base_logp_chosen=float(log_probs["plain_base"][index, 0]),
                plain_base_logp_rejected=float(log_probs["plain_base"][index, 1]),
            )
        if tuned is not None:
            gap = (tuned[index, 0] - base[index, 0]) - (tuned[index, 1] - base[index, 1])
            record.update(
                tuned_logp_chosen=float(tuned[index, 0]),
                tuned_logp_rejected=float(tuned[index, 1]),
                reward_margin=float(config.beta * gap),
            )
        per_pair.append(record)
    return section, per_pair


def _evaluate_generative(
    config: EvaluationConfig, eval_set: GenerativeEvalSet, models: _Models, processor: Any, callback: Callback
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    samples = eval_set.samples
    requests = [GenerationRequest.from_prompt(sample.prompt, [sample.image]) for sample in samples]
    objects = [sample.objects for sample in samples]
    judged: dict[str, list[ChairSample]] = {}
    ratings: dict[str, dict[str, Any]] = {}
    for which in models.names:
        callback.on_stage("generating", {"model": which, "samples": len(samples)})
        with models.use(which) as model:
            responses = generate(
                model,
                processor,
                requests,
                config.generation,
                batch_size=config.batch_size,
                progress=lambda done, total: callback.on_progress("generating", done, total),
            )
        judged[which] = chair_samples(responses, objects, eval_set.vocabulary)
        if config.judge is not None:
            callback.on_stage("judging", {"model": which, "samples": len(samples), "judge": config.judge.model})
            ratings[which] = judge_answers(
                config.judge,
                samples,
                responses,
                progress=lambda done, total: callback.on_progress("judging", done, total),
            )
    section: dict[str, Any] = {
        "data": config.data.generative,
        "vocabulary": config.data.vocabulary,
        "samples": len(samples),
        "base": summarize_chair(judged["base"]),
        "tuned": summarize_chair(judged["tuned"]) if "tuned" in judged else None,
    }
    if "plain_base" in judged:
        section["plain_base"] = summarize_chair(judged["plain_base"])
    if ratings:
        # MMHal-style judge (optional): mean 0-6 rating and share rated below 3, per model.
        section["judge"] = {which: {k: v for k, v in r.items() if k != "ratings"} for which, r in ratings.items()}
    per_sample = []
    for index, sample in enumerate(samples):
        record: dict[str, Any] = {
            "id": sample.sample_id,
            "image": sample.image_reference,
            "prompt": sample.prompt,
            "objects": list(sample.objects),
        }
        for which, judgements in judged.items():
            record[which] = judgements[index].to_dict()
            if which in ratings:
                record[which]["judge_rating"] = ratings[which]["ratings"][index]
        per_sample.append(record)
    return section, per_sample


def run_evaluation(
    config: EvaluationConfig,
    callback: Callback | None = None,
    *,
    preference_rows: Sequence[PreferenceRow] | None = None,
) -> EvaluationResult:
    """Evaluate the base model and, with ``config.adapter``, the tuned one; write the results.

    Preference data: each model's own log-prob statistics, and (with an adapter) the implicit-reward metrics with
    the tuned model as policy and the base as reference, per hardness bucket when the pairs carry or get a
    hardness. Generative data: answers from each model, judged with :func:`chair`. With ``model.init_adapter``
    ``base`` is base + that adapter (the tuned one's starting point and reference) and ``plain_base`` is added.

    Writes into ``config.output_dir``: ``results.json``, ``generations.jsonl`` (per sample: prompt, true objects,
    and per model the response with its mentioned, hallucinated, covered and missed objects),
    ``preference_pairs.jsonl`` (per pair: hardness, bucket, log-probs, reward margin) and ``evaluation.png``.
    """
    from dama_engine.models import load_processor, resolve_dtype

    callback = callback or Callback()
    started = time.monotonic()
    output_dir = Path(config.output_dir)

    callback.on_stage("validating", {})
    device = _resolve_device(config.device)
    inputs = _validate_inputs(config, preference_rows)

    callback.on_stage("loading_model", {"model": config.model.name_or_path, "adapter": config.adapter})
    dtype = resolve_dtype(config.model.precision, device)
    processor = load_processor(config.model)
    models = _load_models(config, inputs, device, dtype)

    results: dict[str, Any] = {
        "model": config.model.name_or_path,
        "adapter": config.adapter,
        "init_adapter": config.model.init_adapter,  # set: "base" is base + this adapter, "plain_base" the model
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "beta": config.beta,
        "generation": config.generation.model_dump(),
        "preference": None,
        "generative": None,
    }
    per_pair: list[dict[str, Any]] = []
    per_sample: list[dict[str, Any]] = []
    if inputs.rows:
        bf16 = dtype == torch.bfloat16
        results["preference"], per_pair = _evaluate_preference(
            config, inputs.rows, models, processor, device, bf16, callback
        )
    if inputs.generative is not None:
        results["generative"], per_sample = _evaluate_generative(config, inputs.generative, models, processor, callback)

    callback.on_stage("writing", {"output_dir": str(output_dir)})
    output_dir.mkdir(parents=True, exist_ok=True)
    result = EvaluationResult(
        output_dir=output_dir,
        results=results,
        results_path=output_dir / "results.json",
        chart_path=output_dir / "evaluation.png",
    )
    if per_sample:
        result.generations_path = _write_jsonl(output_dir / "generations.jsonl", per_sample)
        result.generations = per_sample
    if per_pair:
        result.pairs_path = _write_jsonl(output_dir / "preference_pairs.jsonl", per_pair)
    plot_evaluation(results, result.chart_path)
    result.seconds = time.monotonic() - started
    results["seconds"] = result.seconds
    result.results_path.write_text(json.dumps(results, indent=2) + "\n")
    return result


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reporting: the base-vs-tuned table and the chart

GENERATIVE_METRICS: tuple[str, ...] = ("chair_s", "chair_i", "hallucination_rate", "coverage", "mean_length")


def comparison_table(results: dict[str, Any], *, base: str = "base") -> list[tuple[str, float | None, float | None]]:
    """``(metric, base, tuned)`` rows of a results dict (None where a model has no such value).

    The implicit-reward rows have no base value: the base is their reference (its own rewards are 0).
    ``base="plain_base"``: the same rows with the plain base model's values in the base column (results of a
    model tuned from a starting adapter); all None where the results have no such model.
    """
    rows: list[tuple[str, float | None, float | None]] = []
    generative = results.get("generative")
    if generative:
        tuned = generative.get("tuned") or {}
        base_summary = generative.get(base) or {}
        rows += [(name, base_summary.get(name), tuned.get(name)) for name in GENERATIVE_METRICS]
    preference = results.get("preference")
    if preference:
        base_stats = preference.get(base)
        tuned_stats = preference.get("tuned")
        groups = ["overall", *(BUCKETS if preference["base"].get("buckets") else ())]
        for group in groups:
            base_block: dict[str, Any] = {}
            if base_stats:
                base_block = base_stats["overall"] if group == "overall" else base_stats["buckets"][group]
            tuned_block = None
            if tuned_stats:
                tuned_block = tuned_stats["overall"] if group == "overall" else tuned_stats["buckets"][group]
            suffix = "" if group == "overall" else f" [{group}]"
            rows.append(
                (
                    f"logp_accuracy{suffix}",
                    base_block.get("logp_accuracy"),
                    tuned_block and tuned_block["logp_accuracy"],
                )
            )
        implicit = preference.get("implicit_reward")
        if implicit:
            for group in ["overall", *(BUCKETS if implicit.get("buckets") else ())]:
                block = implicit["overall"] if group == "overall" else implicit["buckets"][group]
                suffix = "" if group == "overall" else f" [{group}]"
                rows += [
                    (f"reward_accuracy{suffix}", None, block["accuracy"]),
                    (f"reward_margin{suffix}", None, block["margin"]),
                ]
            rows.append(("dpo_loss", None, implicit["overall"]["loss"]))
    return rows


def plot_evaluation(results: dict[str, Any], out_png: Path) -> Path:
    """Three panels: CHAIR metrics base vs tuned; preference accuracy per hardness bucket (base and tuned log-prob
    accuracy, tuned implicit-reward accuracy); tuned reward margin per bucket. Panels without data say so."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    generative, preference = results.get("generative"), results.get("preference")

    def bars(
        axis: Any, labels: list[str], series: dict[str, list[float | None]], title: str, *, rates: bool = True
    ) -> None:
        axis.set_title(title)
        if not labels or not any(v is not None for values in series.values() for v in values):
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
            axis.set_xticks([])
            return
        width = 0.8 / max(len(series), 1)
        for offset, (name, values) in enumerate(series.items()):
            positions = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(labels))]
            heights = [math.nan if v is None else v for v in values]
            axis.bar(positions, heights, width, label=name)
        axis.set_xticks(range(len(labels)), labels)
        axis.grid(axis="y", alpha=0.3)
        axis.axhline(0, color="black", linewidth=0.6)
        if rates:
            axis.set_ylim(0, 1.15)
        axis.legend(loc="upper right", fontsize=8)

    rates = ["chair_s", "chair_i", "hallucination_rate", "coverage"]
    base_name = "base + start" if results.get("init_adapter") else "base"  # tuned from a starting adapter
    gen_series: dict[str, list[float | None]] = {}
    if generative:
        if generative.get("plain_base"):
            gen_series["plain base"] = [generative["plain_base"][name] for name in rates]
        gen_series[base_name] = [generative["base"][name] for name in rates]
        if generative.get("tuned"):
            gen_series["tuned"] = [generative["tuned"][name] for name in rates]
    rate_labels = ["CHAIRs", "CHAIRi", "Hal", "Cover"]
    bars(axes[0], rate_labels if generative else [], gen_series, "object hallucination (lower CHAIR/Hal is better)")

    groups: list[str] = []
    group_labels: list[str] = []
    accuracy_series: dict[str, list[float | None]] = {}
    margin_series: dict[str, list[float | None]] = {}
    if preference:
        groups = ["overall", *(BUCKETS if preference["base"].get("buckets") else ())]

        def pick(stats: dict[str, Any] | None, group: str, key: str) -> float | None:
            if not stats:
                return None
            block = stats["overall"] if group == "overall" else (stats.get("buckets") or {}).get(group)
            return None if block is None else block.get(key)

        group_labels = [f"{g}\n(n={pick(preference['base'], g, 'count')})" for g in groups]
        if preference.get("plain_base"):
            accuracy_series["plain base log-prob"] = [
                pick(preference["plain_base"], g, "logp_accuracy") for g in groups
            ]
        accuracy_series[f"{base_name} log-prob"] = [pick(preference["base"], g, "logp_accuracy") for g in groups]
        if preference.get("tuned"):
            accuracy_series["tuned log-prob"] = [pick(preference["tuned"], g, "logp_accuracy") for g in groups]
        if preference.get("implicit_reward"):
            implicit = preference["implicit_reward"]
            accuracy_series["tuned implicit reward"] = [pick(implicit, g, "accuracy") for g in groups]
            margin_series[f"tuned vs {base_name}"] = [pick(implicit, g, "margin") for g in groups]
    bars(axes[1], group_labels, accuracy_series, "preference accuracy by hardness")
    margin_labels = group_labels if margin_series else []
    bars(axes[2], margin_labels, margin_series, "tuned reward margin by hardness (beta-scaled)", rates=False)

    adapter = results.get("adapter")
    figure.suptitle(f"{results.get('model', '')}" + (f"  vs  {adapter}" if adapter else ""), fontsize=9)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


# --------------------------------------------------------------------------------------------------------------
# After training: base against tuned on the run's held-out pairs and generative set
# --------------------------------------------------------------------------------------------------------------


def after_training_config(
    config: TrainConfig, adapter_dir: Path, output_dir: Path, *, train_rows: Sequence[PreferenceRow], held_out: bool
) -> EvaluationConfig:
    """The evaluation a training run ends with (``config.evaluation``): its held-out pairs (``data.eval`` or the
    ``data.eval_fraction`` split) and its generative set. Pairs are bucketed by hardness as the run computed it:
    user scores with the run's ``hardness.rescale``, or, when CLIP scored the training data, the same CLIP scorer
    and aggregation (pairs without scores are not scored when the run used none: that would load a scorer the run
    never needed)."""
    section = config.evaluation
    clip_scored = config.objective.build().uses_hardness and user_hardness(train_rows) is None
    preference = config.data.eval
    if preference is None and held_out:
        preference = f"{config.data.train} (held out: data.eval_fraction {config.data.eval_fraction})"
    return parse_evaluation_config(
        {
            "model": config.model.model_dump(),
            "adapter": str(adapter_dir),
            "data": {
                "preference": preference if held_out else None,
                "format": config.data.format,
                "generative": section.generative,
                "vocabulary": section.vocabulary,
                "max_pairs": section.max_pairs,
                "max_samples": section.max_samples,
                "max_length": config.data.max_length,
                "truncate_answers": config.data.truncate_answers,
                "skip_invalid_rows": config.data.skip_invalid_rows,
            },
            "generation": {"max_new_tokens": section.max_new_tokens},
            "hardness": {
                "scorer": config.hardness.scorer if clip_scored else None,
                "aggregation": config.hardness.aggregation,
                "rescale": config.hardness.rescale,
            },
            "beta": config.objective.beta,
            "batch_size": config.optim.batch_size,
            "output_dir": str(output_dir / "evaluation"),
        }
    )


def evaluate_after_training(
    config: TrainConfig,
    adapter_dir: Path,
    output_dir: Path,
    callback: Callback,
    *,
    train_rows: Sequence[PreferenceRow],
    held_out: Sequence[PreferenceRow],
) -> EvaluationResult | None:
    """Base against tuned after training, if configured: the held-out pairs the run used (``held_out``, from
    ``data.eval`` or ``data.eval_fraction``) and the generative set; None when there is nothing to evaluate."""
    section = config.evaluation
    if not section.enabled or not (held_out or section.generative):
        return None
    evaluation_config = after_training_config(
        config, adapter_dir, output_dir, train_rows=train_rows, held_out=bool(held_out)
    )
    callback.on_stage("evaluating", {"when": "base_vs_tuned"})
    progress = _EvaluationProgress(callback)
    return run_evaluation(evaluation_config, progress, preference_rows=list(held_out) or None)


class _EvaluationProgress(Callback):
    """The evaluation's inner stages are progress inside the run's ``evaluating`` stage."""

    def __init__(self, outer: Callback) -> None:
        self.outer = outer

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.outer.on_progress(f"evaluating/{stage}", done, total)
