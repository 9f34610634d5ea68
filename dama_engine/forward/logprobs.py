"""Summed answer log-probabilities (``logp(y)`` of shared/DAMA.md: a sum over response tokens, not a mean)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from dama_engine.forward.batching import PairBatch
from dama_engine.models import unwrap_model


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[targets]`` row by row, so float32 copies never cover the whole batch's vocabulary.

    Args:
        logits: (B, T, V) in any float dtype.
        targets: (B, T) token ids.
    Returns:
        (B, T) float32 log-probs.
    """
    rows = []
    for row_logits, row_targets in zip(logits, targets, strict=True):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def pair_log_probs(model: Any, batch: PairBatch, *, forward: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and rejected answers of a :class:`PairBatch`: two (N,) float32 tensors.

    ``forward`` is a :data:`dama_engine.forward.packing.PairForward` (``auto``, ``packed``, ``two_rows``,
    ``model_logits``); by default the one set on the model by :func:`dama_engine.forward.packing.set_pair_forward`, else
    ``auto``. The fast paths live in :mod:`dama_engine.forward.packing`; ``model_logits`` is the code below: the plain
    layout, with logits only from the last prompt position on (``logits_to_keep``) where the model supports it.
    """
    from dama_engine.forward import packing

    path = packing.pair_forward_for(model, forward)
    if path != "model_logits":
        return packing.FAST_FORWARDS[path](model, batch)
    width = batch.input_ids.shape[1]
    start = max(batch.first_answer - 1, 0)
    kwargs: dict[str, Any] = {}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = width - start
    else:
        start = 0
    outputs = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        use_cache=False,
        **batch.model_inputs,
        **kwargs,
    )
    logits = outputs.logits[:, -(width - start) :]
    # The logit at position t predicts token t + 1.
    targets = batch.input_ids[:, start + 1 :]
    mask = batch.answer_mask[:, start + 1 :]
    per_token = token_log_probs(logits[:, :-1], targets)
    summed = (per_token * mask).sum(dim=-1)
    n = batch.num_pairs
    return summed[:n], summed[n:]
