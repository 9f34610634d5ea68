"""Preference pairs from the user's own model: sample several answers per prompt of a generative set, judge each
against the image's true objects with the CHAIR matcher, pair a faithful answer with a hallucinating one
(:mod:`.rule`), write the dataset, the per-sample file and the report (:mod:`.output`).

Generic: any generative set (``image``, ``prompt``, ``objects`` and its ``vocabulary.json``) and any model the
engine loads; nothing here knows the proving ground's shapes world.

**Batching and seeds.** ``sampling.prompts_per_batch`` prompts, each repeated ``sampling.samples_per_prompt``
times, go through one ``generate`` call (one prefill, then decoding with the KV cache). Every sample draws its
tokens from its own RNG, seeded from ``(generation.seed, prompt id, sample number)`` (:func:`sample_seed`), so a
sample does not depend on the batch it ran in: a restarted run, or one with another batch size, reproduces the same
samples (exactly on CPU; on a GPU up to the last bits of batched arithmetic).

**Sets without objects.** With ``config.judge``, the set is a prompt set (no ``objects``): a judge lists each
image's objects first (stage ``listing_objects``, :mod:`.labels`), and the samples are judged against those. Prompts
whose image the judge could not answer for are skipped and counted (``report["judge"]``).

**The worker's hooks** (:class:`~dama_engine.callbacks.Callback`): stages :data:`PAIR_STAGES` (``listing_objects``
only with a judge); during ``listing_objects``, ``on_progress("listing_objects", images done, images)``; during
``generating``, ``on_progress("generating", prompts done, prompts)`` after every batch; ``should_stop`` is polled
before every batch, and a stop returns a result with ``stopped=True`` having written nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dama_engine.callbacks import Callback
from dama_engine.config import ConfigError
from dama_engine.data import GenerativeSample, Vocabulary, judge_response, load_generative_eval
from dama_engine.errors import UserError
from dama_engine.pairs.config import PairsConfig
from dama_engine.pairs.labels import ObjectJudgeConfig, group_by_image, label_prompts, labels_report
from dama_engine.pairs.output import PairOutput, write_output
from dama_engine.pairs.report import PromptSamples, pair_report
from dama_engine.pairs.rule import choose_pair

PAIR_STAGES: tuple[str, ...] = ("validating", "listing_objects", "loading_model", "generating", "writing")
"""Stages :func:`generate_pairs` reports through ``Callback.on_stage``, in order."""


class NoPairsError(UserError):
    """No prompt yielded a pair; the message says how many were tried, why, and what to change."""


class JudgeUnavailableError(UserError):
    """The judge answered for none of the images (the message gives the first failure)."""


@dataclass
class PairGenerationResult:
    stopped: bool  # should_stop() said so: nothing was written
    prompts: int  # prompts sampled (all of them unless stopped)
    pairs: int
    samples: int
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    output: PairOutput | None = None  # None when stopped


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The RNG seed of one sample: a hash of the run's seed, the prompt's id and the sample's number."""
    digest = hashlib.sha256(f"dama-pairs:{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _load_prompts(config: PairsConfig) -> tuple[list[GenerativeSample], Vocabulary]:
    data = config.data
    eval_set = load_generative_eval(data.generative, data.vocabulary, labelled=config.judge is None)
    prompts = eval_set.samples[: data.max_prompts] if data.max_prompts else eval_set.samples
    start = config.model.init_adapter
    if start is not None and not (Path(start) / "adapter_config.json").is_file():
        raise ConfigError(f"model.init_adapter: {start} holds no adapter_config.json (a PEFT adapter)")
    return prompts, eval_set.vocabulary


def _load_model(config: PairsConfig, device: Any) -> tuple[Any, Any]:
    from peft import PeftModel

    from dama_engine.models import load_model, load_processor, resolve_dtype

    model = load_model(config.model, dtype=resolve_dtype(config.model.precision, device)).to(device)
    if config.model.init_adapter is not None:  # sample base + the adapter (a job's output, a loop's last round)
        model = PeftModel.from_pretrained(model, config.model.init_adapter).to(device)
    return model.eval(), load_processor(config.model)


def generate_pairs(
    config: PairsConfig, callback: Callback | None = None, *, judge_address: str | None = None
) -> PairGenerationResult:
    """Sample, judge, pair and write (module docstring); the result says where everything went.
    ``judge_address``: connect to the judge there (an address the caller checked) instead of resolving its host.

    Raises:
        GenerativeEvalError, VocabularyError, ConfigError: bad input, before any model is loaded.
        JudgeUnavailableError: the judge answered for no image (nothing is written).
        NoPairsError: no prompt yielded a pair (nothing is written).
    """
    from dama_engine.evaluation import resolve_device
    from dama_engine.forward import GenerationRequest, generate

    callback = callback or Callback()
    started = time.monotonic()
    callback.on_stage("validating", {})
    device = resolve_device(config.device)
    prompts, vocabulary = _load_prompts(config)
    judge_report: dict[str, Any] | None = None
    if config.judge is not None:
        listed = _list_objects(config.judge, prompts, vocabulary, callback, connect_to=judge_address)
        if listed is None:
            return PairGenerationResult(stopped=True, prompts=0, pairs=0, samples=0, seconds=time.monotonic() - started)
        prompts, judge_report = listed

    callback.on_stage("loading_model", {"model": config.model.name_or_path, "adapter": config.model.init_adapter})
    model, processor = _load_model(config, device)

    per_prompt, per_batch = config.sampling.samples_per_prompt, config.sampling.prompts_per_batch
    callback.on_stage("generating", {"prompts": len(prompts), "samples": len(prompts) * per_prompt})
    done: list[PromptSamples] = []
    generating_started = time.monotonic()
    for start in range(0, len(prompts), per_batch):
        if callback.should_stop():
            return PairGenerationResult(
                stopped=True, prompts=len(done), pairs=0, samples=0, seconds=time.monotonic() - started
            )
        batch = prompts[start : start + per_batch]
        images = [p.image.load() for p in batch]  # decoded once per prompt, shared by its samples
        requests = [
            GenerationRequest.from_prompt(p.prompt, [image])
            for p, image in zip(batch, images, strict=True)
            for _ in range(per_prompt)
        ]
        seeds = [sample_seed(config.generation.seed, p.sample_id, k) for p in batch for k in range(per_prompt)]
        answers = generate(model, processor, requests, config.generation, batch_size=len(requests), row_seeds=seeds)
        for position, prompt in enumerate(batch):
            rows = slice(position * per_prompt, (position + 1) * per_prompt)
            judged = tuple(judge_response(answer, prompt.objects, vocabulary) for answer in answers[rows])
            done.append(PromptSamples(prompt, tuple(seeds[rows]), judged, choose_pair(judged)))
        callback.on_progress("generating", len(done), len(prompts))
    generating_seconds = time.monotonic() - generating_started

    report = pair_report(done)
    if judge_report is not None:
        report["judge"] = judge_report
    if not report["pairs"]:
        raise NoPairsError(_no_pairs_message(config, report))
    callback.on_stage("writing", {"output_dir": config.output_dir, "pairs": report["pairs"]})
    report.update(
        model=config.model.name_or_path,
        init_adapter=config.model.init_adapter,
        generative=config.data.generative,
        generation=config.generation.model_dump(),
        sampling=config.sampling.model_dump(),
        device=str(device),
        seconds=round(time.monotonic() - started, 3),
        samples_per_second=round(report["samples"] / generating_seconds, 3) if generating_seconds > 0 else None,
    )
    output = write_output(Path(config.output_dir), done, report)
    return PairGenerationResult(
        stopped=False,
        prompts=len(done),
        pairs=report["pairs"],
        samples=report["samples"],
        seconds=time.monotonic() - started,
        report=report,
        output=output,
    )


def _list_objects(
    judge: ObjectJudgeConfig,
    prompts: list[GenerativeSample],
    vocabulary: Vocabulary,
    callback: Callback,
    *,
    connect_to: str | None,
) -> tuple[list[GenerativeSample], dict[str, Any]] | None:
    """The prompts with the objects the judge listed (prompts of images it failed on dropped), and its report;
    None when the run was asked to stop."""
    groups = group_by_image(prompts)
    callback.on_stage("listing_objects", {"images": len(groups), "prompts": len(prompts), "judge": judge.model})
    found = label_prompts(
        judge,
        groups,
        vocabulary,
        connect_to=connect_to,
        progress=lambda done, total: callback.on_progress("listing_objects", done, total),
        should_stop=callback.should_stop,
    )
    if found is None:
        return None
    report = labels_report(found, model=judge.model, name=judge.name)
    if report["failed_images"] == report["images"]:
        raise JudgeUnavailableError(
            f"the judge ({judge.name or judge.url}, model {judge.model}) answered for none of the "
            f"{report['images']} images; the first failure: {report['first_error']}"
        )
    listed = [
        replace(prompt, objects=found[prompt.sample_id].objects)
        for prompt in prompts
        if found[prompt.sample_id].error is None
    ]
    return listed, report


def _no_pairs_message(config: PairsConfig, report: dict[str, Any]) -> str:
    tried, per_prompt = report["prompts_tried"], config.sampling.samples_per_prompt
    return (
        f"no pairs: {tried} prompts tried with {per_prompt} samples each; "
        f"{report['prompts_without_faithful_sample']} had no faithful sample (no hallucinated object) and "
        f"{report['prompts_without_hallucinating_sample']} had no hallucinating one "
        f"({report['faithful_samples']} faithful and {report['hallucinating_samples']} hallucinating samples in all, "
        f"{report['empty_samples']} empty). A prompt needs both: raise sampling.samples_per_prompt "
        f"(now {per_prompt}) or generation.temperature (now {config.generation.temperature}), give more prompts "
        f"(data.max_prompts), or check that the vocabulary names the objects the model talks about"
    )
