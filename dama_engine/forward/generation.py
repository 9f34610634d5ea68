"""Batched, deterministic answer generation for a vision-language model (base, or base + adapter).

:func:`generate` renders each request with the processor's chat template, pads the batch on the **left** (so every
row's last prompt token sits in the same column and new tokens follow it directly), generates, and returns only the
new text. Greedy decoding is the default, so the same model, prompts and settings give the same answers on every
run and at any batch size. Sampling (``temperature > 0``) is seeded from :attr:`GenerationSettings.seed` in a forked
RNG, so the caller's random state is left alone; it repeats exactly for the same inputs and batch size.

**Seeded rows** (``row_seeds``): each request draws its tokens from its own RNG instead (one uniform number per row
and step, turned into a token through the row's temperature / top-k / top-p distribution), so a row's answer depends
on its seed and its own logits only, not on which other rows share its batch or where the batch starts. Pair
generation seeds every sample this way, so a restarted run reproduces its samples while still batching many
prompts per call.

The model may be a transformers model or a peft model; for the base of a peft model, call inside
``with model.disable_adapter():`` (the adapter switched off, never a second copy of the weights).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dama_engine.data import ImageSource, PreferenceRow
from dama_engine.forward.compiling import eager
from dama_engine.models import unwrap_model

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` with the number of requests answered so far."""


class GenerationSettings(BaseModel):
    """How answers are decoded. The checkpoint's own sampling defaults (its ``generation_config.json``) are
    overridden by these, so a base model and its tuned version decode under the same rules."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_new_tokens: int = Field(default=128, gt=0, description="Most tokens generated per answer (EOS stops sooner).")
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy decoding (default); > 0: sampling.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens (sampling only); 0: off.")
    seed: int = Field(default=0, description="Seed of the sampling RNG (unused when greedy).")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to answer: a chat conversation (transformers chat-template form) and its images, in order.

    Images may be decoded (PIL) or sources (:class:`ImageSource`, decoded when their batch is encoded).
    """

    messages: tuple[dict[str, Any], ...]
    images: tuple[Image.Image | ImageSource, ...] = ()

    @classmethod
    def from_prompt(cls, prompt: str, images: Sequence[Image.Image | ImageSource] = ()) -> GenerationRequest:
        """A single user turn: one image placeholder per image, then the prompt text."""
        content: list[dict[str, str]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": prompt})
        return cls(messages=({"role": "user", "content": content},), images=tuple(images))

    @classmethod
    def from_row(cls, row: PreferenceRow) -> GenerationRequest:
        """The prompt of a preference row (its answers are ignored)."""
        return cls(messages=tuple(row.prompt_chat()), images=row.images)


def _load_image(image: Image.Image | ImageSource) -> Image.Image:
    return image.load() if isinstance(image, ImageSource) else image


def _model_device_and_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    inner = unwrap_model(model)
    dtype = getattr(inner, "dtype", None)
    device = next(inner.parameters()).device
    return device, dtype if isinstance(dtype, torch.dtype) else torch.float32


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the generation config's EOS ids, else the tokenizer's."""
    eos = getattr(unwrap_model(model).generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {int(eos)}


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device, enabled: bool) -> Iterator[None]:
    """Seed torch's RNG for the block, then restore the caller's state (CPU and the model's CUDA device)."""
    if not enabled:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def encode_requests(processor: Any, requests: Sequence[GenerationRequest]) -> Any:
    """The batch's model inputs, left-padded (chat template with the generation prompt; BOS added unless the
    template wrote it): what :func:`generate_token_ids` feeds ``generate``, and `dama infer` too."""
    texts = [
        processor.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
        for request in requests
    ]
    tokenizer = getattr(processor, "tokenizer", processor)
    # As in PairEncoder: add BOS unless the chat template already wrote it (so prompts match the scored ones).
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and texts[0].startswith(bos))
    images: list[list[Image.Image]] | None = [[_load_image(image) for image in request.images] for request in requests]
    if not any(images or []):
        images = None
    return processor(
        text=texts,
        images=images,
        padding=True,
        padding_side="left",
        return_tensors="pt",
        add_special_tokens=add_special,
    )


class _RowSampler:
    """A logits processor that samples each row with its own RNG and hands generate() a one-hot choice.

    Used with greedy decoding (``do_sample=False``): it returns ``0`` at the sampled token and ``-inf`` elsewhere,
    so the argmax is the sample and transformers' loop, KV cache and stopping stay as they are. Every row consumes
    one uniform number per step (finished rows too), so its stream never depends on the others'.
    """

    def __init__(self, settings: GenerationSettings, seeds: Sequence[int]) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        warpers: list[Any] = [TemperatureLogitsWarper(settings.temperature)]
        if settings.top_k:
            warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(settings.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.rngs = [random.Random(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        warped = self.warpers(cast(torch.LongTensor, input_ids), cast(torch.FloatTensor, scores.float()))
        probs = torch.softmax(warped, dim=-1)
        cumulative = probs.cumsum(dim=-1)
        uniform = torch.tensor([[rng.random()] for rng in self.rngs], dtype=cumulative.dtype, device=probs.device)
        # Inverse CDF: the first token whose cumulative mass exceeds u * total (a zero-mass token never qualifies).
        choice = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
        choice = choice.clamp(max=probs.shape[-1] - 1)
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(-1, choice, 0.0)


def _generation_kwargs(settings: GenerationSettings, pad_token_id: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.sampling,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "pad_token_id": pad_token_id,
    }
    if settings.sampling:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return kwargs


@torch.no_grad()
def generate_token_ids(
    model: Any,
    processor: Any,
    requests: Sequence[GenerationRequest],
    settings: GenerationSettings | None = None,
    *,
    batch_size: int = 8,
    progress: ProgressCallback | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """The new token ids of each request's answer, cut before the first EOS token (EOS and padding removed).

    Requests are answered ``batch_size`` at a time, in order, on the model's device. ``row_seeds`` (sampling only):
    one seed per request, each row sampled from its own RNG (module docstring).
    """
    settings = settings or GenerationSettings()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if row_seeds is not None and (not settings.sampling or len(row_seeds) != len(requests)):
        raise ValueError("row_seeds: one seed per request, and only with sampling (temperature > 0)")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    device, dtype = _model_device_and_dtype(model)
    greedy = settings.model_copy(update={"temperature": 0.0})  # with row seeds the sampler draws, generate() argmaxes
    kwargs = _generation_kwargs(settings if row_seeds is None else greedy, pad_token_id)
    was_training = model.training
    model.eval()
    answers: list[list[int]] = []
    try:
        # Compiled decoder layers (optim.compile) would recompile for every cache length: generate eagerly.
        with _seeded(settings.seed, device, settings.sampling), eager():
            for start in range(0, len(requests), batch_size):
                batch = requests[start : start + batch_size]
                features = encode_requests(processor, batch)
                inputs = {
                    key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
                    for key, value in features.items()
                    if isinstance(value, torch.Tensor)
                }
                extra: dict[str, Any] = {}
                if row_seeds is not None:  # greedy over one-hot scores: the row sampler has drawn each token
                    extra["logits_processor"] = [_RowSampler(settings, row_seeds[start : start + batch_size])]
                sequences = model.generate(**inputs, **kwargs, **extra)
                # With left padding every prompt ends at the same column: the new tokens are what follows it.
                new_tokens = sequences[:, inputs["input_ids"].shape[1] :].tolist()
                for ids in new_tokens:
                    stop = next((i for i, token in enumerate(ids) if token in eos_ids), len(ids))
                    answers.append(ids[:stop])
                if progress is not None:
                    progress(len(answers), len(requests))
    finally:
        if was_training:
            model.train()
    return answers


def generate(
    model: Any,
    processor: Any,
    requests: Sequence[GenerationRequest],
    settings: GenerationSettings | None = None,
    *,
    batch_size: int = 8,
    progress: ProgressCallback | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[str]:
    """Each request's answer as text, without the prompt (special tokens dropped, surrounding space trimmed).

    See :func:`generate_token_ids` for the arguments.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = generate_token_ids(
        model, processor, requests, settings, batch_size=batch_size, progress=progress, row_seeds=row_seeds
    )
    return [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in ids]
