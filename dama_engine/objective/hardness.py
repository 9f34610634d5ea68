"""Per-pair data hardness ``delta_i`` for DAMA's data-aware strategy (shared/DAMA.md section 1).

The pipeline, offline and once per dataset and scorer:

1. split every answer into short sub-sentences (section 1.1; :func:`split_sub_sentences`, pluggable through
   :class:`Splitter` and :func:`get_splitter`);
2. score every sub-sentence against the pair's image with CLIP and aggregate per pair (section 1.2;
   :class:`ClipHardnessScorer`, :func:`joint_softmax`, :func:`mean_cosine`);
3. take the dataset mean ``delta_bar`` from the data, never a constant (section 1.3; :func:`compute_hardness`).

Users may supply their own scores instead, and then no CLIP model is loaded (section 1.5; :func:`user_hardness`).
The data-aware factor ``alpha_D,i = sigma(delta_i) / sigma(delta_bar)`` (section 1.4) is computed by the
objective, not here.

Aggregations work on a *flat* layout: one score per sub-sentence of a batch of pairs, with ``pair_index`` (which
pair it belongs to) and ``is_chosen`` (which answer), reduced with segment sums; no Python loop per sub-sentence.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import torch

from dama_engine.data import PreferenceRow
from dama_settings.names import AGGREGATIONS as AGGREGATIONS
from dama_settings.names import Aggregation as Aggregation

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------------------------------------------
# Section 1.1: sub-sentences
# --------------------------------------------------------------------------------------------------------------


class Splitter(Protocol):
    """Turns one answer into its sub-sentences (DAMA.md section 1.1). Must return ``[]`` for blank text."""

    def __call__(self, text: str) -> list[str]: ...


# Short forms after which a single "." does not end a sentence ("Mr. Smith"), except those in _MAY_END_SENTENCE
# when the next word starts with a capital ("..., pears etc. The table ..."). Dotted forms (e.g., U.S.) are
# recognised by _DOTTED_ABBREVIATION.
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "approx", "fig", "cf", "al", "ca"}
)
_MAY_END_SENTENCE = frozenset({"etc"})
# One or more terminators, optional closing quotes/brackets, then whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_DOTTED_ABBREVIATION = re.compile(r"(?:[a-z]\.)+[a-z]", re.IGNORECASE)  # e.g, i.e, U.S, a.m
_BULLET = re.compile(r"^(?:[-*•]\s+)+")
# Coordinating conjunctions that may start a new clause, and the fewest words each side needs for a split.
_CONJUNCTION = re.compile(r"(?P<comma>\s*,\s*(?:and|but|or|so|yet|nor)\s+)|(?P<bare>\s+(?:and|but)\s+)", re.IGNORECASE)
_MIN_WORDS_COMMA = 2
_MIN_WORDS_BARE = 3
_TRAILING = ".,;:!?… \t"
_LEADING = ",;: \t"


def _word_count(text: str) -> int:
    return sum(1 for word in text.split() if any(char.isalnum() for char in word))


def _is_abbreviation(text: str, period_at: int) -> bool:
    """Whether the ``.`` at ``period_at`` closes an abbreviation that does not end the sentence."""
    word_start = max(text.rfind(" ", 0, period_at), text.rfind("\t", 0, period_at)) + 1
    word = text[word_start:period_at].lstrip("([\"'“‘").lower()
    if word in _MAY_END_SENTENCE:
        rest = text[period_at + 1 :].lstrip()
        return not (rest[:1].isupper())
    return word in _ABBREVIATIONS or _DOTTED_ABBREVIATION.fullmatch(word) is not None


def _sentences(line: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(line):
        if match.group().rstrip("\"'”’)]") == "." and _is_abbreviation(line, match.start()):
            continue
        pieces.append(line[start : match.end()])
        start = match.end()
    pieces.append(line[start:])
    return pieces


def _clauses(text: str) -> list[str]:
    """Split one ``;``-free clause at coordinating conjunctions, greedily left to right (see the rules)."""
    candidates = list(_CONJUNCTION.finditer(text))
    pieces: list[str] = []
    start = 0
    for number, match in enumerate(candidates):
        needed = _MIN_WORDS_COMMA if match.group("comma") else _MIN_WORDS_BARE
        right_end = candidates[number + 1].start() if number + 1 < len(candidates) else len(text)
        if _word_count(text[start : match.start()]) >= needed and _word_count(text[match.end() : right_end]) >= needed:
            pieces.append(text[start : match.start()])
            start = match.end()
    pieces.append(text[start:])
    return pieces


def _clean(piece: str) -> str:
    piece = _BULLET.sub("", " ".join(piece.split())).strip(_LEADING)
    return piece.rstrip(_TRAILING).strip()


def split_sub_sentences(text: str) -> list[str]:
    """Split an answer into short sub-sentences with fixed rules (DAMA.md section 1.1, the ``rule`` splitter).

    Deterministic; the rules, in order:

    1. **Lines.** Line breaks are hard boundaries (answers often list items one per line).
    2. **Sentences.** A run of ``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets) ends a
       sentence when whitespace or the end of the line follows. So decimals (``3.5``) and dots inside words
       (``file.txt``) never split. A single ``.`` does *not* end a sentence after an abbreviation: a title or
       common short form (``Mr. Mrs. Ms. Dr. Prof. Sr. Jr. St. vs. etc. approx. fig. cf. al. ca.``, any case)
       or any dotted short form (``e.g.``, ``i.e.``, ``U.S.``, ``a.m.``). Exception: ``etc.`` does end a
       sentence when the next word starts with a capital letter. Single-letter initials are not special.
    3. **Semicolons.** Every ``;`` ends a clause.
    4. **Conjunctions.** A clause is split, and the conjunction dropped, at
       ``", and " / ", but " / ", or " / ", so " / ", yet " / ", nor "`` when both sides have at least 2 words,
       and at bare ``" and " / " but "`` when both sides have at least 3 words, so noun phrases stay whole
       (``"a black and white photo"``, ``"red, white, and blue"``, ``"a cat and a dog"``) while clauses part
       (``"The sky is blue and the grass is green"``). Candidates are taken left to right; the left side counts
       from the previous split, the right side up to the next candidate (or the clause end). Words are
       whitespace-separated tokens with at least one letter or digit.
    5. **Clean-up.** Each piece is trimmed and inner runs of whitespace become one space; leading bullets
       (``-``, ``*``, ``•``) and leading ``, ; :`` are removed, trailing punctuation (``. , ; : ! ? …``) is
       stripped, and pieces without any letter (empty ones, list numbers such as ``"1"``) are dropped.

    Blank text gives ``[]``. Case is kept (CLIP's tokenizer lower-cases anyway).
    """
    sub_sentences: list[str] = []
    for line in text.splitlines():
        for sentence in _sentences(line):
            for clause in sentence.split(";"):
                for piece in _clauses(clause):
                    cleaned = _clean(piece)
                    if any(char.isalpha() for char in cleaned):
                        sub_sentences.append(cleaned)
    return sub_sentences


SPLITTERS: Mapping[str, Splitter] = MappingProxyType({"rule": split_sub_sentences})


def get_splitter(name: str = "rule") -> Splitter:
    """The splitter registered under ``name`` (DAMA.md section 1.1 [decision]: ``rule`` by default).

    An LLM splitter is added by listing it in ``SPLITTERS``; :class:`ClipHardnessScorer` also accepts any
    :class:`Splitter` object directly.
    """
    try:
        return SPLITTERS[name]
    except KeyError:
        raise ValueError(f"unknown splitter {name!r}; choose one of {sorted(SPLITTERS)}") from None


def pieces_or_whole(splitter: Splitter, text: str) -> list[str]:
    """The sub-sentences of ``text``; if none, the whole trimmed text as one piece; if blank, none at all."""
    return splitter(text) or ([text.strip()] if text.strip() else [])


# --------------------------------------------------------------------------------------------------------------
# Section 1.2: aggregations over per-sub-sentence CLIP scores (flat layout, segment sums)
# --------------------------------------------------------------------------------------------------------------


def flat_index(chosen_counts: Sequence[int], rejected_counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat layout for pairs whose answers have the given sub-sentence counts.

    Sub-sentences are laid out pair by pair, each pair's chosen sub-sentences first, then its rejected ones.

    Returns:
        ``pair_index`` (S,) long, the pair of each sub-sentence; ``is_chosen`` (S,) bool, its answer;
        ``S = sum(chosen_counts) + sum(rejected_counts)``.
    """
    if len(chosen_counts) != len(rejected_counts):
        raise ValueError("chosen_counts and rejected_counts need one entry per pair")
    counts = torch.tensor([[c, r] for c, r in zip(chosen_counts, rejected_counts, strict=True)], dtype=torch.long)
    counts = counts.reshape(-1, 2)
    num_pairs = counts.shape[0]
    pair_index = torch.arange(num_pairs).repeat_interleave(counts.sum(dim=1))
    is_chosen = torch.tensor([True, False]).repeat(num_pairs).repeat_interleave(counts.flatten())
    return pair_index, is_chosen


def _side_sums(values: torch.Tensor, pair_index: torch.Tensor, is_chosen: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Segment sums of ``values`` (S,) into (num_pairs, 2): column 0 the chosen side, column 1 the rejected."""
    segment = pair_index * 2 + (~is_chosen).long()
    sums = torch.zeros(num_pairs * 2, dtype=values.dtype, device=values.device)
    return sums.index_add_(0, segment, values).view(num_pairs, 2)


def joint_softmax(
    logits: torch.Tensor, pair_index: torch.Tensor, is_chosen: torch.Tensor, num_pairs: int
) -> torch.Tensor:
    """``delta_i = s_w - s_l`` from one softmax over all sub-sentences of both answers (DAMA.md section 1.2).

    For pair ``i`` with sub-sentence logits ``z_k`` (CLIP's ``logit_scale.exp() * cosine``),
    ``p_k = exp(z_k) / sum_{k' in pair i} exp(z_k')``, ``s_w = sum_{k chosen} p_k``, ``s_l = sum_{k rejected} p_k``.
    ``s_w + s_l = 1`` when both answers have sub-sentences, so ``delta_i`` lies in [-1, 1]. An answer without
    sub-sentences contributes zero (its side sums to 0); a pair with none at all gets ``delta_i = 0``.

    Args:
        logits: (S,) scaled image-text logits of the sub-sentences, flat layout (:func:`flat_index`).
        pair_index: (S,) long, pair of each sub-sentence, in ``[0, num_pairs)``.
        is_chosen: (S,) bool, True for sub-sentences of the chosen answer.
        num_pairs: N.

    Returns:
        (N,) float32 ``delta``.
    """
    logits = logits.float()
    # Subtract each pair's max before exp so large logit scales (CLIP: 100) cannot overflow.
    pair_max = torch.full((num_pairs,), -math.inf, device=logits.device).scatter_reduce(
        0, pair_index, logits, reduce="amax", include_self=True
    )
    weights = torch.exp(logits - pair_max[pair_index])
    totals = torch.zeros(num_pairs, device=logits.device).index_add_(0, pair_index, weights)
    probabilities = weights / totals[pair_index]
    sides = _side_sums(probabilities, pair_index, is_chosen, num_pairs)
    return sides[:, 0] - sides[:, 1]


def mean_cosine(
    cosine: torch.Tensor, pair_index: torch.Tensor, is_chosen: torch.Tensor, num_pairs: int
) -> torch.Tensor:
    """``delta_i`` = mean cosine of the chosen sub-sentences minus that of the rejected ones (DAMA.md 1.2).

    The alternative aggregation. An answer without sub-sentences has mean 0. Arguments and result as in
    :func:`joint_softmax`, with (S,) cosine similarities in place of logits; ``delta_i`` lies in [-2, 2].
    """
    cosine = cosine.float()
    sums = _side_sums(cosine, pair_index, is_chosen, num_pairs)
    counts = _side_sums(torch.ones_like(cosine), pair_index, is_chosen, num_pairs)
    means = sums / counts.clamp(min=1.0)
    return means[:, 0] - means[:, 1]


def aggregate(
    aggregation: str,
    *,
    cosine: torch.Tensor,
    logit_scale: float | torch.Tensor,
    pair_index: torch.Tensor,
    is_chosen: torch.Tensor,
    num_pairs: int,
) -> torch.Tensor:
    """Apply the named aggregation (DAMA.md section 1.2) to per-sub-sentence cosines; (N,) ``delta``."""
    if aggregation == "joint_softmax":
        return joint_softmax(cosine.float() * logit_scale, pair_index, is_chosen, num_pairs)
    if aggregation == "mean_cosine":
        return mean_cosine(cosine, pair_index, is_chosen, num_pairs)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}")


# --------------------------------------------------------------------------------------------------------------
# Section 1.5: user-supplied scores
# --------------------------------------------------------------------------------------------------------------


def user_hardness(rows: Sequence[PreferenceRow]) -> torch.Tensor | None:
    """The users' own ``delta_i`` (DAMA.md section 1.5), or None when no row carries scores.

    Per row, ``hardness`` if set, else ``chosen_score - rejected_score`` when both are set. So if every row has
    ``hardness`` it is used throughout, and if every row has both scores their difference is. When no row has
    any of the three fields the result is None (score with CLIP). When only some rows can be resolved, the
    dataset is inconsistent and a ValueError names the first row lacking scores.

    Returns:
        (N,) float32 tensor, or None.
    """
    deltas: list[float] = []
    first_missing: str | None = None
    any_scores = False
    for position, row in enumerate(rows):
        if row.hardness is not None or row.chosen_score is not None or row.rejected_score is not None:
            any_scores = True
        if row.hardness is not None:
            value = float(row.hardness)
        elif row.chosen_score is not None and row.rejected_score is not None:
            value = float(row.chosen_score) - float(row.rejected_score)
        else:
            if first_missing is None:
                first_missing = row_label(row, position)
            continue
        if not math.isfinite(value):
            raise ValueError(f"{row_label(row, position)} has a non-finite hardness score ({value})")
        deltas.append(value)
    if not any_scores:
        return None
    if first_missing is not None:
        raise ValueError(
            f"{first_missing} lacks hardness or chosen_score/rejected_score while other rows have them; "
            "give scores for every row or for none (then CLIP scores all rows)"
        )
    return torch.tensor(deltas, dtype=torch.float32)


def rescale_minmax(delta: torch.Tensor) -> torch.Tensor:
    """Map user scores linearly onto [-1, 1], the range ``joint_softmax`` gives (``hardness.rescale: minmax``).

    ``delta' = 2 (delta - min) / (max - min) - 1`` over the dataset, so the easiest pair gets -1 and the hardest 1
    and alpha_D spans the same range as with CLIP scores. Equal scores carry no ordering: all map to 0.
    """
    low, high = delta.min(), delta.max()
    if float(high - low) == 0.0:
        return torch.zeros_like(delta)
    return (2 * (delta.double() - low) / (high - low) - 1).to(delta.dtype)


def row_label(row: PreferenceRow, position: int) -> str:
    number = row.row_number or position + 1
    return f"row {number} (id {row.row_id!r})"
