"""Scoring rows with a model as it is: the length check every split goes through, encoding a batch of rows, and
the summed log-probs of every row's chosen and rejected answer. Training (reference pass, held-out metrics) and
evaluation share them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from dama_engine.data import DataError, PreferenceRow
from dama_engine.forward.batching import EncodingError, PairBatch, PairEncoder, collate_pairs
from dama_engine.forward.logprobs import pair_log_probs


def check_lengths(encoder: PairEncoder, rows: list[PreferenceRow], split: str, skip: bool) -> list[PreferenceRow]:
    """Encode every row once (without pixels) to find those over max_length, image tokens included."""
    kept, errors = [], []
    for row in rows:
        try:
            encoder.encode(row, with_images=False)
            kept.append(row)
        except EncodingError as error:
            errors.append({"row": error.row_number, "field": error.field, "reason": error.reason})
    if errors and not skip:
        lines = "\n".join(f"  row {e['row']}: {e['field']}: {e['reason']}" for e in errors[:20])
        raise DataError(f"data.{split}: {len(errors)} rows do not fit the model\n{lines}", errors)
    return kept


def encode_batch(encoder: PairEncoder, rows: Sequence[PreferenceRow], indices: Sequence[int]) -> PairBatch:
    pad = encoder.tokenizer.pad_token_id
    if pad is None:
        pad = encoder.tokenizer.eos_token_id
    return collate_pairs([encoder.encode(rows[i], i) for i in indices], pad)


@torch.no_grad()
def pair_log_probs_all(
    model: Any,
    encoder: PairEncoder,
    rows: list[PreferenceRow],
    batch_size: int,
    device: torch.device,
    bf16: bool,
    progress: Any = None,
) -> torch.Tensor:
    """(N, 2) summed log-probs of every row's chosen and rejected answer under ``model`` as it is."""
    out = torch.zeros(len(rows), 2)
    for start in range(0, len(rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(rows))))
        batch = encode_batch(encoder, rows, indices).to(device)
        with autocast(device, bf16):
            chosen, rejected = pair_log_probs(model, batch)
        out[indices, 0] = chosen.float().cpu()
        out[indices, 1] = rejected.float().cpu()
        if progress is not None:
            progress(indices[-1] + 1, len(rows))
    return out


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (LoRA weights stay float32; their matmuls run in bf16), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
