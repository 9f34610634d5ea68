"""Fast forwards for a :class:`~dama_engine.forward.batching.PairBatch`: one packed row per pair, and an answer-only
head.

Two independent speed-ups of :func:`dama_engine.forward.logprobs.pair_log_probs`, chosen by :data:`PairForward`:

* **answer-only head** (``two_rows`` and ``packed``): the model's output head (``lm_head``) runs only on the
  positions that predict an answer token, and the float32 log-softmax runs over them in chunks that are recomputed
  in the backward pass, so the (rows, positions, vocabulary) logits are never materialised. The hidden states are
  taken from the input of the model's own head during its own forward (a pre-hook that hands the head an empty
  slice), so the forward still goes through every wrapper (DDP, peft) and the family's own vision code.
* **packed layout** (``packed``): each pair becomes one row ``[prompt (with image tokens), chosen, rejected]``.
  The rejected answer's positions restart where the prompt ends, and a boolean 4D attention mask keeps the causal
  order except that rejected tokens cannot see chosen tokens; the first rejected token is scored from the last
  prompt position. So each rejected token sees exactly what it sees in its own ``[prompt, rejected]`` row, while
  the image and prompt are encoded once per pair instead of twice (the vision tower too). Rows are right-padded
  to a common width; padded keys are masked, and a padded query sees only itself (so no row of the mask is
  empty, which would give NaN in attention and, through 0 * NaN, in the gradients).

Which families can pack: those whose forward takes a custom 4D mask and explicit ``position_ids``
(``FamilySpec.accepts_4d_attention_mask`` / ``accepts_position_ids``) with the ``sdpa`` or ``eager`` attention
(flash-attention kernels take no 4D mask). Qwen2-VL's M-RoPE positions come from the model's own
``get_rope_index`` over ``[prompt, chosen]``; the rejected tokens (text) continue from the last prompt position.
Families read off an unknown model type (``generic:...``) keep the model's own logits (``model_logits``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch.utils.checkpoint import checkpoint

from dama_engine.forward.batching import PER_TOKEN_KEYS, PairBatch
from dama_engine.models import family_for, unwrap_model

PairForward = Literal["auto", "packed", "two_rows", "model_logits"]
"""How a pair batch goes through the model.

``packed``: one row per pair and the answer-only head; ``two_rows``: the plain 2N-row layout and the answer-only
head; ``model_logits``: the plain layout and the model's own logits (the reference implementation, any model);
``auto``: ``packed`` where the model supports it, else ``two_rows`` for a registered family, else ``model_logits``.
"""
PAIR_FORWARDS: tuple[str, ...] = get_args(PairForward)
ResolvedPairForward = Literal["packed", "two_rows", "model_logits"]

LOGIT_CHUNK_TOKENS = 1024
"""Answer positions per chunk of the answer-only head: float32 logits of at most this many rows exist at once."""

_MODEL_ATTRIBUTE = "dama_pair_forward"
_MASKABLE_ATTENTION = ("sdpa", "eager")


# ---------------------------------------------------------------------------------------------------------------
# Which forward a model gets
# ---------------------------------------------------------------------------------------------------------------


def _attention_implementation(model: Any) -> str | None:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)


def _family(model: Any) -> Any:
    try:
        return family_for(model)
    except (TypeError, ValueError):
        return None


def packing_unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot use the packed layout, or None when it can."""
    base = unwrap_model(model)
    family = _family(base)
    if family is None or family.name.startswith("generic:"):
        name = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
        return f"model type {name!r} is not a registered family (its 4D mask and position_ids are unverified)"
    if not (family.accepts_4d_attention_mask and family.accepts_position_ids):
        return f"the {family.name} family takes no custom 4D attention mask and position_ids"
    attention = _attention_implementation(base)
    if attention not in _MASKABLE_ATTENTION:
        return f"attention implementation {attention!r} takes no custom 4D mask (use sdpa or eager)"
    if family.position_ids_kind == "mrope" and not hasattr(getattr(base, "model", None), "get_rope_index"):
        return "this transformers version exposes no model.model.get_rope_index for M-RoPE positions"
    if base.get_output_embeddings() is None:
        return "the model has no output embeddings (lm_head)"
    return None


def resolve_pair_forward(model: Any, requested: str) -> ResolvedPairForward:
    """Turn a requested :data:`PairForward` into the one ``model`` will run; refuse an impossible request.

    Raises:
        ValueError: ``requested`` is unknown, or names a path this model cannot take (the message says which to
            use instead).
    """
    if requested not in PAIR_FORWARDS:
        raise ValueError(f"pair_forward {requested!r} is unknown; choose one of {', '.join(PAIR_FORWARDS)}")
    if requested == "model_logits":
        return "model_logits"
    base = unwrap_model(model)
    family = _family(base)
    registered = family is not None and not family.name.startswith("generic:")
    has_head = registered and base.get_output_embeddings() is not None
    packing_reason = packing_unsupported_reason(base)
    if requested == "packed":
        if packing_reason is not None:
            raise ValueError(f"pair_forward 'packed' is not possible: {packing_reason}; use 'auto' or 'two_rows'")
        return "packed"
    if requested == "two_rows":
        if not has_head:
            raise ValueError(
                "pair_forward 'two_rows' needs a registered model family with an lm_head; use 'model_logits'"
            )
        return "two_rows"
    if packing_reason is None:
        return "packed"
    return "two_rows" if has_head else "model_logits"


def set_pair_forward(model: Any, requested: str) -> ResolvedPairForward:
    """Check ``requested`` against ``model`` now (fail early) and make it the default of ``pair_log_probs``.

    The choice is kept on the unwrapped transformers model, like its gradient-checkpointing setting, so the
    reference pass, the evaluation and the training step all take the same path.
    """
    resolved = resolve_pair_forward(model, requested)
    setattr(unwrap_model(model), _MODEL_ATTRIBUTE, (requested, resolved))
    return resolved


def configured_pair_forward(model: Any) -> str:
    """The :data:`PairForward` set on ``model`` by :func:`set_pair_forward`; ``auto`` when none was."""
    return str(getattr(unwrap_model(model), _MODEL_ATTRIBUTE, ("auto",))[0])


def pair_forward_for(model: Any, requested: str | None) -> ResolvedPairForward:
    """The path ``pair_log_probs`` takes: ``requested``, else the one set by :func:`set_pair_forward` (resolved
    once, there), else ``auto``."""
    if requested is None:
        configured = getattr(unwrap_model(model), _MODEL_ATTRIBUTE, None)
        if configured is not None:
            return configured[1]
        requested = "auto"
    return resolve_pair_forward(model, requested)


# ---------------------------------------------------------------------------------------------------------------
# The answer-only head
# ---------------------------------------------------------------------------------------------------------------


def _head_log_probs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def head_token_log_probs(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, *, chunk_tokens: int = LOGIT_CHUNK_TOKENS
) -> torch.Tensor:
    """``log softmax(head(hidden))[targets]`` in float32, ``chunk_tokens`` positions at a time.

    With gradients on, each chunk is checkpointed: the backward pass recomputes its logits (one more product
    with the head, about 2% of a 7B model's step) instead of keeping float32 logits of every answer position.

    Args:
        hidden: (M, H) hidden states of the positions that predict the targets.
        head: the model's output head, (M, H) -> (M, V).
        targets: (M,) token ids.
    Returns:
        (M,) float32 log-probs.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, chunk_targets = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and chunk.requires_grad:
            piece = checkpoint(_head_log_probs, chunk, chunk_targets, head, use_reentrant=False)
        else:
            piece = _head_log_probs(chunk, chunk_targets, head)
        pieces.append(piece)
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def _forward_hidden_states(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.nn.Module]:
    """Run ``model(**inputs)`` and return the hidden states its output head received, and the head.

    A pre-hook takes the head's input and hands the head an empty slice instead: the model's own forward runs
    (through DDP and peft wrappers, with its own vision and mask code) but computes no logits.
    """
    head = unwrap_model(model).get_output_embeddings()
    captured: list[torch.Tensor] = []

    def take_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        captured.append(hidden)
        return (hidden[..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take_input)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the output head during the forward, saw {len(captured)}")
    return captured[0], head


def _summed_by_segment(
    model: Any, inputs: dict[str, Any], plan: _ScoringPlan, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, head = _forward_hidden_states(model, inputs)
    device = hidden.device
    flat = hidden.reshape(-1, hidden.shape[-1])
    picked = flat.index_select(0, plan.source.to(device, non_blocking=True))
    targets = inputs["input_ids"].reshape(-1).index_select(0, plan.target.to(device, non_blocking=True))
    per_token = head_token_log_probs(picked, head, targets, chunk_tokens=chunk_tokens)
    segment = plan.segment.to(device, non_blocking=True)
    summed = torch.zeros(2 * plan.num_pairs, dtype=torch.float32, device=device).index_add(0, segment, per_token)
    return summed[: plan.num_pairs], summed[plan.num_pairs :]


@dataclass(frozen=True)
class _ScoringPlan:
    """Which hidden state scores which token: flat indices into (rows * width), and the answer each belongs to.

    ``segment`` is ``i`` for pair ``i``'s chosen answer and ``N + i`` for its rejected one.
    """

    source: torch.Tensor
    target: torch.Tensor
    segment: torch.Tensor
    num_pairs: int


def _lengths(batch: PairBatch) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected lengths per pair (from the batch's record, else read off its answer mask)."""
    n = batch.num_pairs
    if batch.prompt_lengths and batch.answer_lengths:
        prompt, answers = list(batch.prompt_lengths), list(batch.answer_lengths)
    else:
        mask = batch.answer_mask.cpu()
        answers = mask.sum(dim=1).tolist()
        prompt = mask.to(torch.int8).argmax(dim=1)[:n].tolist()
    return prompt[:n], answers[:n], answers[n:]


# ---------------------------------------------------------------------------------------------------------------
# The plain 2N-row layout with the answer-only head
# ---------------------------------------------------------------------------------------------------------------


def two_row_pair_log_probs(
    model: Any, batch: PairBatch, *, chunk_tokens: int = LOGIT_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen / rejected log-probs (two (N,) float32 tensors) of the plain layout, answer-only head."""
    n, width = batch.num_pairs, batch.input_ids.shape[1]
    prompt, chosen, rejected = _lengths(batch)
    sources, segments = [], []
    for row, (prompt_len, answer_len) in enumerate(zip(prompt + prompt, chosen + rejected, strict=True)):
        # The hidden state at position t predicts token t + 1.
        sources.append(torch.arange(answer_len) + (row * width + prompt_len - 1))
        segments.append(torch.full((answer_len,), row))
    source = torch.cat(sources)
    plan = _ScoringPlan(source=source, target=source + 1, segment=torch.cat(segments), num_pairs=n)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.model_inputs}
    return _summed_by_segment(model, inputs, plan, chunk_tokens)


# ---------------------------------------------------------------------------------------------------------------
# The packed layout
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PackedPairs:
    """N pairs as N rows ``[prompt, chosen, rejected]``, right-padded to ``width``.

    Attributes:
        input_ids: (N, W) token ids (padding: the batch's pad id).
        allowed: (N, 1, W, W) bool, True where query ``q`` may attend to key ``k``.
        position_ids: (N, W) positions; the rejected answer's restart at the prompt's end (0 on padding).
        model_inputs: the vision tensors of each pair once, and per-token extras over the packed row.
        plan: which hidden state scores which answer token.
        prompt_lengths, chosen_lengths, rejected_lengths: per pair.
    """

    input_ids: torch.Tensor
    allowed: torch.Tensor
    position_ids: torch.Tensor
    model_inputs: dict[str, torch.Tensor]
    plan: _ScoringPlan
    prompt_lengths: list[int]
    chosen_lengths: list[int]
    rejected_lengths: list[int]

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


def pack_pairs(batch: PairBatch, *, pad_to_multiple_of: int = 16) -> PackedPairs:
    """Build the packed layout of ``batch`` on the batch's device (the index arithmetic runs on the CPU).

    ``pad_to_multiple_of`` rounds the width up so the mask's rows are aligned for the fused attention kernels.
    """
    n, plain_width = batch.num_pairs, batch.input_ids.shape[1]
    device = batch.input_ids.device
    prompt, chosen, rejected = _lengths(batch)
    lengths = [p + c + r for p, c, r in zip(prompt, chosen, rejected, strict=True)]
    width = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of

    p = torch.tensor(prompt).unsqueeze(1)
    c = torch.tensor(chosen).unsqueeze(1)
    total = torch.tensor(lengths).unsqueeze(1)
    t = torch.arange(width).unsqueeze(0)
    in_rejected = t >= p + c
    real = t < total
    # Where each packed token comes from in the plain layout: row i (prompt + chosen) or row N + i (rejected).
    pair = torch.arange(n).unsqueeze(1)
    source_row = torch.where(in_rejected, pair + n, pair)
    source_col = torch.where(in_rejected, t - c, t).masked_fill(~real, 0)
    gather = (source_row * plain_width + source_col).to(device, non_blocking=True)
    real_device = real.to(device, non_blocking=True)
    pad_id = batch.pad_token_id
    input_ids = batch.input_ids.reshape(-1)[gather].masked_fill(~real_device, pad_id)
    position_ids = torch.where(in_rejected, t - c, t).masked_fill(~real, 0).to(device, non_blocking=True)

    # The mask, built on the device from the per-pair boundaries.
    q = torch.arange(width, device=device).view(1, width, 1)
    k = torch.arange(width, device=device).view(1, 1, width)
    p_d, c_d, total_d = (x.to(device).view(n, 1, 1) for x in (p, c, total))
    query_rejected = (q >= p_d + c_d) & (q < total_d)
    key_chosen = (k >= p_d) & (k < p_d + c_d)
    allowed = (k <= q) & (q < total_d) & ~(query_rejected & key_chosen)
    allowed = (allowed | (k == q)).unsqueeze(1)

    model_inputs: dict[str, torch.Tensor] = {}
    for key, value in batch.model_inputs.items():
        if key in PER_TOKEN_KEYS:
            # Prompt tokens keep their values (image / video markers); answer tokens are text (0).
            in_prompt = (t < p).to(device, non_blocking=True)
            model_inputs[key] = value.reshape(-1)[gather].masked_fill(~in_prompt, 0)
        else:
            # collate_pairs stacks each pair's vision tensors twice (chosen rows, then rejected rows): keep one.
            model_inputs[key] = value[: value.shape[0] // 2]

    sources, targets, segments = [], [], []
    for i, (prompt_len, chosen_len, rejected_len) in enumerate(zip(prompt, chosen, rejected, strict=True)):
        row = i * width
        chosen_targets = torch.arange(chosen_len) + (row + prompt_len)
        sources.append(chosen_targets - 1)
        targets.append(chosen_targets)
        segments.append(torch.full((chosen_len,), i))
        rejected_targets = torch.arange(rejected_len) + (row + prompt_len + chosen_len)
        rejected_sources = rejected_targets - 1
        if rejected_len:
            rejected_sources[0] = row + prompt_len - 1  # the first rejected token follows the prompt
        sources.append(rejected_sources)
        targets.append(rejected_targets)
        segments.append(torch.full((rejected_len,), n + i))
    plan = _ScoringPlan(source=torch.cat(sources), target=torch.cat(targets), segment=torch.cat(segments), num_pairs=n)
    return PackedPairs(
        input_ids=input_ids,
        allowed=allowed,
        position_ids=position_ids,
        model_inputs=model_inputs,
        plan=plan,
        prompt_lengths=prompt,
        chosen_lengths=chosen,
        rejected_lengths=rejected,
    )


def _attention_mask_for(model: Any, allowed: torch.Tensor) -> torch.Tensor:
    """The 4D mask in the form the attention implementation reads: bool for sdpa, additive float for eager."""
    base = unwrap_model(model)
    if _attention_implementation(base) == "sdpa":
        return allowed
    dtype = base.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _mrope_position_ids(model: Any, packed: PackedPairs) -> torch.Tensor:
    """Qwen2-VL's (3, N, W) M-RoPE positions: the model's own over ``[prompt, chosen]``; rejected tokens (text)
    continue from the last prompt position, as they would in their own ``[prompt, rejected]`` row."""
    inner = unwrap_model(model).model
    device = packed.input_ids.device
    n, width = packed.input_ids.shape
    p = torch.tensor(packed.prompt_lengths, device=device).view(n, 1)
    c = torch.tensor(packed.chosen_lengths, device=device).view(n, 1)
    r = torch.tensor(packed.rejected_lengths, device=device).view(n, 1)
    t = torch.arange(width, device=device).view(1, width)
    prompt_and_chosen = (t < p + c).long()
    positions, _ = inner.get_rope_index(
        input_ids=packed.input_ids,
        mm_token_type_ids=packed.model_inputs.get("mm_token_type_ids"),
        image_grid_thw=packed.model_inputs.get("image_grid_thw"),
        attention_mask=prompt_and_chosen,
    )
    last_prompt = positions.gather(2, (p - 1).view(1, n, 1).expand(positions.shape[0], n, 1))
    in_rejected = (t >= p + c) & (t < p + c + r)
    rejected_positions = last_prompt + (t - (p + c) + 1)
    return torch.where(in_rejected.unsqueeze(0), rejected_positions, positions)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def packed_pair_log_probs(
    model: Any, batch: PairBatch, *, chunk_tokens: int = LOGIT_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen / rejected log-probs (two (N,) float32 tensors) through the packed layout.

    Falls back to :func:`two_row_pair_log_probs` (with a warning, once) when Qwen2-VL's ``get_rope_index``
    cannot be called the way this module expects.
    """
    packed = pack_pairs(batch)
    base = unwrap_model(model)
    family = family_for(base)
    position_ids = packed.position_ids
    if family.position_ids_kind == "mrope":
        try:
            position_ids = _mrope_position_ids(model, packed)
        except (TypeError, ValueError, AttributeError, RuntimeError) as error:
            _warn_once(f"packed layout: M-RoPE positions failed ({error}); using the two-row layout")
            return two_row_pair_log_probs(model, batch, chunk_tokens=chunk_tokens)
    inputs = {
        "input_ids": packed.input_ids,
        "attention_mask": _attention_mask_for(model, packed.allowed),
        "position_ids": position_ids,
        **packed.model_inputs,
    }
    return _summed_by_segment(model, inputs, packed.plan, chunk_tokens)


FAST_FORWARDS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "packed": packed_pair_log_probs,
    "two_rows": two_row_pair_log_probs,
}
"""The fast paths by resolved :data:`PairForward` name (``model_logits`` is ``logprobs.pair_log_probs``'s own)."""
