"""Canonical rows -> token ids -> model batches.

Each pair is rendered with the processor's own chat template: the prompt (with images) once, then each answer
as the text the template appends after the generation prompt. The prompt keeps every image token the processor
expands it to; over-long pairs are rejected, or (if asked) cut inside the *answers* only, never in the prompt.

The plain layout puts the chosen rows and the rejected rows in one batch of 2N sequences, so a single forward
pass serves both answers (as in the DPO reference code: one pass, one set of kernel launches, and batch-norm-free
models see identical inputs either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dama_engine.data import PixelBudget, PreferenceRow
from dama_engine.errors import UserError

# Per-token processor outputs that must be extended over the answer tokens (with 0: "text token").
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
_TEXT_KEYS = ("input_ids", "attention_mask", *PER_TOKEN_KEYS)


class EncodingError(UserError):
    """A row cannot be encoded for this model (too long, template mismatch); the message says which and why."""

    def __init__(self, row: PreferenceRow, field: str, reason: str) -> None:
        super().__init__(f"row {row.row_number or row.row_id}: {field}: {reason}")
        self.row_number = row.row_number
        self.field = field
        self.reason = reason


@dataclass
class EncodedPair:
    """One pair as token ids: the shared prompt, and each answer's ids after it.

    ``vision`` holds the processor's image tensors for this pair's prompt (``pixel_values``, ``image_grid_thw``,
    ``pixel_attention_mask``, ``image_sizes``...), each with the processor's leading batch dimension;
    ``prompt_token_extras`` holds per-token outputs aligned with ``prompt_ids`` (for example ``mm_token_type_ids``).
    """

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_token_extras: dict[str, list[int]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Longest of the two sequences (prompt + answer), image tokens included."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


class PairEncoder:
    """Turns a :class:`PreferenceRow` into an :class:`EncodedPair` with a transformers processor."""

    def __init__(
        self, processor: Any, *, max_length: int, truncate_answers: bool = False, pixels: PixelBudget | None = None
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.truncate_answers = truncate_answers
        self.pixels = pixels or PixelBudget()  # images are resized into it before the processor, never cut

    def _answer_suffix(self, row: PreferenceRow, prompt_text: str, answer: str, name: str) -> str:
        full = self.processor.apply_chat_template(row.conversation(answer), tokenize=False)
        if not full.startswith(prompt_text):
            raise EncodingError(row, name, "the chat template renders the prompt differently once an answer follows it")
        return full[len(prompt_text) :]

    def encode(self, row: PreferenceRow, index: int = 0, *, with_images: bool = True) -> EncodedPair:
        """Encode one row. ``with_images=False`` skips the pixel tensors (for a length check)."""
        prompt_text = self.processor.apply_chat_template(row.prompt_chat(), add_generation_prompt=True, tokenize=False)
        images = [self.pixels.fit(source.load()) for source in row.images]
        # As transformers' own apply_chat_template(tokenize=True): add BOS unless the template already wrote it.
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and prompt_text.startswith(bos))
        features = self.processor(
            text=[prompt_text], images=images or None, return_tensors="pt", add_special_tokens=add_special
        )
        prompt_ids = features["input_ids"][0].tolist()
        answers = []
        for name, answer in (("chosen", row.chosen), ("rejected", row.rejected)):
            suffix = self._answer_suffix(row, prompt_text, answer, name)
            ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
            # Some templates (LLaVA-1.5's) end the assistant turn without EOS; score the stop as TRL does.
            eos = self.tokenizer.eos_token_id
            if eos is not None and eos not in ids:
                ids = [*ids, eos]
            answers.append(ids)
        chosen_ids, rejected_ids = answers

        room = self.max_length - len(prompt_ids)
        if room < 1:
            raise EncodingError(
                row, "prompt", f"{len(prompt_ids)} tokens with image tokens, over max_length {self.max_length}"
            )
        for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            if len(ids) > room and not self.truncate_answers:
                raise EncodingError(
                    row,
                    name,
                    f"{len(prompt_ids)} prompt + {len(ids)} answer tokens exceed max_length {self.max_length} "
                    "(set data.truncate_answers=true to cut answers, or raise data.max_length)",
                )
        extras = {key: features[key][0].tolist() for key in PER_TOKEN_KEYS if key in features}
        vision = {}
        if with_images:
            vision = {k: v for k, v in features.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        return EncodedPair(
            index=index,
            prompt_ids=prompt_ids,
            chosen_ids=chosen_ids[:room],
            rejected_ids=rejected_ids[:room],
            vision=vision,
            prompt_token_extras=extras,
        )


@dataclass
class PairBatch:
    """2N sequences: rows ``[0, N)`` are prompt+chosen, rows ``[N, 2N)`` prompt+rejected, right-padded.

    ``answer_mask[b, t]`` is True where token ``t`` of row ``b`` belongs to the answer (the tokens scored).
    ``first_answer`` is the smallest answer start over the batch (logits before it are never needed).
    ``prompt_lengths`` (N) and ``answer_lengths`` (2N, in row order) repeat the masks' lengths as ints, and
    ``pad_token_id`` the padding, so the packed layout (:mod:`dama_engine.forward.packing`) is built without a device
    sync.
    The vision tensors in ``model_inputs`` are each pair's tensors stacked twice along dim 0 (chosen rows, then
    rejected rows).
    """

    indices: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    first_answer: int
    model_inputs: dict[str, torch.Tensor]
    prompt_lengths: tuple[int, ...] = ()
    answer_lengths: tuple[int, ...] = ()
    pad_token_id: int = 0

    @property
    def num_pairs(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            indices=self.indices,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            answer_mask=self.answer_mask.to(device),
            first_answer=self.first_answer,
            model_inputs={k: v.to(device) for k, v in self.model_inputs.items()},
            prompt_lengths=self.prompt_lengths,
            answer_lengths=self.answer_lengths,
            pad_token_id=self.pad_token_id,
        )


def collate_pairs(pairs: Sequence[EncodedPair], pad_token_id: int) -> PairBatch:
    """Stack N encoded pairs into the 2N-row plain layout."""
    if not pairs:
        raise ValueError("collate_pairs: empty batch")
    rows: list[tuple[EncodedPair, list[int]]] = [(p, p.chosen_ids) for p in pairs] + [
        (p, p.rejected_ids) for p in pairs
    ]
    width = max(len(p.prompt_ids) + len(answer) for p, answer in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    answer_mask = torch.zeros((batch, width), dtype=torch.bool)
    extras = {key: torch.zeros((batch, width), dtype=torch.long) for key in pairs[0].prompt_token_extras}
    for b, (pair, answer) in enumerate(rows):
        prompt_len, total = len(pair.prompt_ids), len(pair.prompt_ids) + len(answer)
        input_ids[b, :total] = torch.tensor(pair.prompt_ids + answer, dtype=torch.long)
        attention_mask[b, :total] = 1
        answer_mask[b, prompt_len:total] = True
        for key, values in pair.prompt_token_extras.items():
            extras[key][b, :prompt_len] = torch.tensor(values, dtype=torch.long)
    vision: dict[str, torch.Tensor] = {}
    for key in pairs[0].vision:
        per_pair = torch.cat([p.vision[key] for p in pairs], dim=0)
        vision[key] = torch.cat([per_pair, per_pair], dim=0)
    first_answer = min(len(p.prompt_ids) for p in pairs)
    return PairBatch(
        indices=torch.tensor([p.index for p in pairs], dtype=torch.long),
        input_ids=input_ids,
        attention_mask=attention_mask,
        answer_mask=answer_mask,
        first_answer=first_answer,
        model_inputs={**vision, **extras},
        prompt_lengths=tuple(len(p.prompt_ids) for p in pairs),
        answer_lengths=tuple(len(answer) for _, answer in rows),
        pad_token_id=pad_token_id,
    )
