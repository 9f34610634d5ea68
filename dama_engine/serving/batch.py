"""One ``model.generate`` call for a batch of chat requests, each row with its own limits, sampling and stream.

What :func:`dama_engine.forward.generate` does for a list of prompts (render with the chat template, pad on the
left, generate, cut at EOS), with what serving needs on top:

* **per-row decoding**: ``generate`` runs greedy over the batch's largest ``max_tokens``; a logits processor
  (:class:`RowSampler`) samples each sampling row from its own RNG with its own temperature and top-p, as the
  engine's seeded rows do (one uniform number per row and step, inverse CDF), so a seeded answer depends on its
  seed and its own logits only, never on its batch; greedy rows keep the model's scores (argmax). Greedy and
  sampling rows share a batch.
* **per-row stopping** (:class:`RowStopping`, a ``StoppingCriteria`` answering one flag per row): a row ends at
  EOS, at its own ``max_tokens``, at its first stop string, or when its client went away; the others go on.
* **per-row streaming** (:class:`RowStreamer`, a ``BaseStreamer``): transformers' decoding loop asks the stopping
  criteria about each step's tokens first, then hands them to the streamer; the criterion decodes each row
  (:class:`~dama_engine.serving.text.RowText`) and decides, the streamer sends every row its new text and, the
  step a row ends, its answer. A row's answer is delivered when it ends, not when the batch does.

Rows talk to their requests through a ``sink`` (called from the generating thread with :class:`TextDelta`,
:class:`Finished` or :class:`Failed`); it must not block.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dama_engine.forward import GenerationRequest, encode_requests, eos_token_ids
from dama_engine.serving.protocol import ChatAnswer, ChatError, RowSettings, server_error
from dama_engine.serving.text import RowText

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextDelta:
    """New text of a streamed answer."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The row's answer is complete."""

    answer: ChatAnswer


@dataclass(frozen=True)
class Failed:
    """The row could not be answered."""

    error: ChatError


Event = TextDelta | Finished | Failed
Sink = Callable[[Event], None]


@dataclass(eq=False)
class BatchRow:
    """One request in a batch: what to answer, how, and where its events go."""

    request: GenerationRequest
    settings: RowSettings
    sink: Sink
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


class RowSampler:
    """A logits processor that samples each sampling row with its own settings and RNG and hands ``generate``
    (greedy) a one-hot choice: ``0`` at the sampled token, ``-inf`` elsewhere. Greedy rows keep their scores.

    A sampling row draws one uniform number per step, finished or not, so its stream depends on its seed alone
    (the rule of the engine's seeded rows, whose tokens it reproduces for the same seed and settings)."""

    def __init__(self, settings: Sequence[RowSettings]) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        self.rows: list[tuple[int, Any, random.Random]] = []
        for index, row in enumerate(settings):
            if row.greedy:
                continue
            warpers: list[Any] = [TemperatureLogitsWarper(row.temperature)]
            if row.top_p < 1.0:
                warpers.append(TopPLogitsWarper(row.top_p))
            seed = row.seed if row.seed is not None else secrets.randbits(64)
            self.rows.append((index, LogitsProcessorList(warpers), random.Random(seed)))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = scores.clone()
        for index, warpers, rng in self.rows:
            ids = cast(torch.LongTensor, input_ids[index : index + 1])
            warped = warpers(ids, cast(torch.FloatTensor, scores[index : index + 1].float()))
            probs = torch.softmax(warped, dim=-1)
            cumulative = probs.cumsum(dim=-1)
            uniform = torch.tensor([[rng.random()]], dtype=cumulative.dtype, device=probs.device)
            # Inverse CDF: the first token whose cumulative mass exceeds u * total (a zero-mass token never qualifies).
            choice = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
            choice = choice.clamp(max=probs.shape[-1] - 1)
            chosen[index] = torch.full_like(scores[index], float("-inf")).scatter_(-1, choice[0], 0.0)
        return chosen


def deliver(row: BatchRow, event: Event) -> None:
    """Hand ``event`` to the row's sink; a sink that fails (its request went away) does not stop the batch."""
    try:
        row.sink(event)
    except Exception:
        log.exception("could not deliver an answer event")


class _Row:
    """A row's progress while the batch generates."""

    def __init__(self, row: BatchRow, tokenizer: Any, prompt_tokens: int) -> None:
        self.row = row
        self.text = RowText(tokenizer, row.settings.stop)
        self.prompt_tokens = prompt_tokens
        self.tokens = 0
        self.finish_reason: str | None = None  # set when the row ends: stop, length or cancelled
        self.reported = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def send(self, event: Event) -> None:
        deliver(self.row, event)

    def publish(self) -> None:
        """Send the row's new text (streaming), and its answer the step it ended."""
        if self.reported:
            return
        if self.finish_reason == "cancelled":
            self.reported = True
            return
        if self.row.stream:
            delta = self.text.delta(final=self.done)
            if delta:
                self.send(TextDelta(delta))
        if self.done:
            self.reported = True
            assert self.finish_reason is not None
            self.send(Finished(ChatAnswer(self.text.answer(), self.finish_reason, self.prompt_tokens, self.tokens)))


class _Progress:
    """The rows of one generate call: what :class:`RowStopping` decides and :class:`RowStreamer` delivers."""

    def __init__(self, rows: list[_Row], eos_ids: set[int]) -> None:
        self.rows = rows
        self.eos_ids = eos_ids

    def step(self, tokens: list[int]) -> list[bool]:
        """Take one new token per row; return which rows are done."""
        for row, token in zip(self.rows, tokens, strict=True):
            if row.done:
                continue
            if row.row.cancelled.is_set():
                row.finish_reason = "cancelled"
                continue
            row.tokens += 1
            if token in self.eos_ids or row.text.add(token):
                row.finish_reason = "stop"
            elif row.tokens >= row.row.settings.max_tokens:
                row.finish_reason = "length"
        return [row.done for row in self.rows]

    def publish(self) -> None:
        for row in self.rows:
            row.publish()

    def end(self, error: ChatError | None = None) -> None:
        """After generate: rows it stopped without a reason of theirs ended at the length limit; on ``error`` the
        unfinished rows fail."""
        for row in self.rows:
            if row.reported:
                continue
            if error is not None:
                row.reported = True
                row.send(Failed(error))
                continue
            if not row.done:
                row.finish_reason = "length"
            row.publish()


class RowStopping(StoppingCriteria):
    """The per-row stopping criterion: one flag per row (transformers ends each row on its own flag)."""

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = self.progress.step(input_ids[:, -1].tolist())
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


class RowStreamer(BaseStreamer):
    """The streamer ``generate`` feeds: its first ``put`` is the prompt (skipped), each later one a step's tokens,
    already read by :class:`RowStopping`; it delivers every row's new text."""

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.progress.publish()

    def end(self) -> None:
        self.progress.publish()


def _model_inputs(features: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in features.items()
        if isinstance(value, torch.Tensor)
    }


@torch.inference_mode()
def run_batch(model: Any, processor: Any, rows: list[BatchRow], *, device: torch.device, dtype: torch.dtype) -> None:
    """Answer ``rows`` with one ``model.generate`` call (the caller has set the adapter, or disabled it for base
    rows). Every row gets exactly one :class:`Finished` or :class:`Failed`, unless it was cancelled."""
    rows = [row for row in rows if not row.cancelled.is_set()]
    if not rows:
        return
    try:
        features = encode_requests(processor, [row.request for row in rows])
    except Exception as error:
        if len(rows) > 1:  # rows the processor will not encode together: each alone (one may be at fault)
            for row in rows:
                run_batch(model, processor, [row], device=device, dtype=dtype)
        else:
            deliver(rows[0], Failed(ChatError(f"The request could not be encoded for this model: {error}")))
        return
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = _model_inputs(features, device, dtype)
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    progress = _Progress(
        [_Row(row, tokenizer, int(count)) for row, count in zip(rows, prompt_tokens, strict=True)],
        eos_token_ids(model, tokenizer),
    )
    sampler = RowSampler([row.settings for row in rows])
    extra: dict[str, Any] = {"logits_processor": [sampler]} if sampler.rows else {}
    try:
        model.generate(
            **inputs,
            max_new_tokens=max(row.settings.max_tokens for row in rows),
            do_sample=False,  # the row sampler has drawn each sampling row's token; greedy rows take the argmax
            num_beams=1,
            repetition_penalty=1.0,
            pad_token_id=pad_token_id,
            stopping_criteria=StoppingCriteriaList([RowStopping(progress)]),
            streamer=RowStreamer(progress),
            **extra,
        )
    except Exception:
        log.exception("generation failed for a batch of %d rows", len(rows))
        progress.end(server_error())
        return
    progress.end()
