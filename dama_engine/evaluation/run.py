"""Evaluating a tuned model against its base: object hallucination (CHAIR, POPE) and held-out preference metrics.

shared/DAMA.md section 7 reports Object HalBench's CHAIRs / CHAIRi and AMBER's CHAIR, Cover and Hal. This module
computes those metrics with a vocabulary the user supplies, and the implicit-reward preference metrics of section 3
split by data hardness (section 1). :func:`run_evaluation` runs both for the base model and the tuned one.

**Tuned from a starting adapter** (``model.init_adapter``, shared/DAMA.md section 4b): the model the tuned one is
compared against (``base``, the reference of its implicit rewards) is base + that adapter, the model its training
started from; the plain base model is reported as well, as ``plain_base`` beside ``base`` and ``tuned``.

The vocabulary, the matcher and :func:`chair` live in the torch-free :mod:`dama_engine.data.matcher`, the
generative eval set loader in :mod:`dama_engine.data.generative` (their docstrings have the file formats, the
matching rules and the CHAIR definitions).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dama_engine.availability import check_available
from dama_engine.callbacks import Callback
from dama_engine.config import ConfigError, TrainConfig
from dama_engine.data import (
    ChairSample,
    DataError,
    GenerativeEvalSet,
    GenerativeSample,
    PreferenceRow,
    chair_samples,
    load_and_validate,
    load_generative_eval,
    summarize_chair,
)
from dama_engine.evaluation.config import EvaluationConfig, after_training_config
from dama_engine.evaluation.judge import judge_answers
from dama_engine.evaluation.metrics import bucket_by_hardness, logprob_stats, preference_metrics
from dama_engine.evaluation.pope import PopeQuestion, pope_metrics, pope_questions
from dama_engine.evaluation.report import plot_evaluation
from dama_engine.forward import GenerationRequest, GenerationSettings, generate
from dama_engine.objective import HardnessConfig, compute_hardness, user_hardness

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


def resolve_device(name: str) -> torch.device:
    """The device a ``device`` setting names (``auto``: CUDA when available); ConfigError for a bad or missing one."""
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
        HardnessConfig.from_settings(section, device=str(device)),
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
    from dama_engine.forward import PairEncoder, check_lengths, pair_log_probs_all

    encoder = PairEncoder(processor, max_length=config.data.max_length, truncate_answers=config.data.truncate_answers)
    usable = check_lengths(encoder, rows, "preference", config.data.skip_invalid_rows)
    if not usable:
        raise DataError("data.preference: no pair fits data.max_length")
    delta, source = _preference_hardness(config, usable, device, callback)
    buckets = bucket_by_hardness(delta, config.hardness.thresholds) if delta is not None else None

    log_probs: dict[str, torch.Tensor] = {}
    for which in models.names:
        callback.on_stage("log_probs", {"model": which, "pairs": len(usable)})
        with models.use(which) as model:
            log_probs[which] = pair_log_probs_all(
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
    pope = _PopeQuestions.build(config, eval_set)
    total = len(samples) + len(pope.asked)
    judged: dict[str, list[ChairSample]] = {}
    pope_answers: dict[str, list[str]] = {}
    ratings: dict[str, dict[str, Any]] = {}
    for which in models.names:
        # One pass per model: the descriptions (CHAIR), then POPE's answers, reported as one stage.
        callback.on_stage("generating", {"model": which, "samples": len(samples), "pope_questions": len(pope.asked)})
        with models.use(which) as model:
            responses = generate(
                model,
                processor,
                requests,
                config.generation,
                batch_size=config.batch_size,
                progress=lambda done, _: callback.on_progress("generating", done, total),
            )
            if pope.asked:
                pope_answers[which] = generate(
                    model,
                    processor,
                    pope.requests(samples),
                    GenerationSettings(max_new_tokens=config.pope.max_new_tokens),
                    batch_size=config.batch_size,
                    progress=lambda done, _: callback.on_progress("generating", len(samples) + done, total),
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
    if pope.asked:
        section["pope"] = pope.summary(config, pope_answers)
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
            if which in pope_answers:
                record[which]["pope"] = pope.answers_of(index, pope_answers[which])
        per_sample.append(record)
    return section, per_sample


@dataclass
class _PopeQuestions:
    """POPE's questions of every split (:func:`pope_questions`), each distinct (image, entry) asked once."""

    splits: dict[str, list[PopeQuestion]]
    asked: list[PopeQuestion]
    _by_image: dict[int, list[int]] | None = None  # image index -> positions in ``asked``

    @classmethod
    def build(cls, config: EvaluationConfig, eval_set: GenerativeEvalSet) -> _PopeQuestions:
        if not config.pope.enabled:
            return cls(splits={}, asked=[])
        objects = [sample.objects for sample in eval_set.samples]
        splits = pope_questions(objects, eval_set.vocabulary, seed=config.pope.seed, per_image=config.pope.per_image)
        asked = list(dict.fromkeys(question for split in splits.values() for question in split))
        return cls(splits=splits, asked=asked)

    def requests(self, samples: Sequence[GenerativeSample]) -> list[GenerationRequest]:
        return [
            GenerationRequest.from_prompt(question.text, [samples[question.image_index].image])
            for question in self.asked
        ]

    def summary(self, config: EvaluationConfig, answers: dict[str, list[str]]) -> dict[str, Any]:
        """Per model (base, tuned, plain_base as evaluated), per split: :func:`pope_metrics`."""
        position = {question: index for index, question in enumerate(self.asked)}
        section: dict[str, Any] = {
            "per_image": config.pope.per_image,
            "seed": config.pope.seed,
            "questions": {split: len(questions) for split, questions in self.splits.items()},
        }
        for which, said in answers.items():
            section[which] = {
                split: pope_metrics(
                    [question.present for question in questions], [said[position[question]] for question in questions]
                )
                for split, questions in self.splits.items()
            }
        return section

    def answers_of(self, image_index: int, answers: list[str]) -> list[dict[str, Any]]:
        """One image's questions with a model's answers (for ``generations.jsonl``)."""
        if self._by_image is None:
            self._by_image = {}
            for index, question in enumerate(self.asked):
                self._by_image.setdefault(question.image_index, []).append(index)
        return [
            {"entry": self.asked[index].entry, "present": self.asked[index].present, "answer": answers[index]}
            for index in self._by_image.get(image_index, [])
        ]


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

    With ``pope.enabled`` (the default) the generative set's images also get POPE's yes/no questions
    (:mod:`.pope`), answered greedily by each model in the same ``generating`` stage: ``results["generative"]
    ["pope"]`` has accuracy, precision, recall, F1 and yes-ratio per split and model.

    Writes into ``config.output_dir``: ``results.json``, ``generations.jsonl`` (per sample: prompt, true objects,
    and per model the response with its mentioned, hallucinated, covered and missed objects, and its POPE answers),
    ``preference_pairs.jsonl`` (per pair: hardness, bucket, log-probs, reward margin) and ``evaluation.png``.
    """
    from dama_engine.models import load_processor, resolve_dtype

    callback = callback or Callback()
    started = time.monotonic()
    output_dir = Path(config.output_dir)

    callback.on_stage("validating", {})
    device = resolve_device(config.device)
    inputs = _validate_inputs(config, preference_rows)
    # After the config's own checks (they answer at once), before minutes of loading.
    check_available(config.model.name_or_path, what="model", revision=config.model.revision)

    callback.on_stage("loading_model", {"model": config.model.name_or_path, "adapter": config.adapter})
    dtype = resolve_dtype(config.model.precision, device)
    processor = load_processor(config.model)
    models = _load_models(config, inputs, device, dtype)

    results: dict[str, Any] = {
        "model": config.model.shown_name,  # the public name where one is set, never a staged folder
        "adapter": config.adapter_name or config.adapter,
        # Set: "base" is base + this adapter, "plain_base" the model. Its folder's name only: a staged folder's path
        # means nothing to whoever reads the results (they travel with the adapter).
        "init_adapter": Path(config.model.init_adapter).name if config.model.init_adapter else None,
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
