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

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dama_engine.data.rows import PreferenceRow
from dama_engine.model_files import code_version, folder_identity
from dama_settings.knobs import HARDNESS
from dama_settings.names import AGGREGATIONS as AGGREGATIONS
from dama_settings.names import HARDNESS_RESCALES, HardnessRescale
from dama_settings.names import Aggregation as Aggregation

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

DEFAULT_SCORER: str = HARDNESS["scorer"].default
"""The CLIP model behind LLaVA-1.5's vision tower, as in the paper (DAMA.md section 1.2)."""

DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
)
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` with the number of pairs scored so far."""

# Bump when the splitter rules, the CLIP scoring or the aggregation code change, so cached results are recomputed.
_CACHE_VERSION = 2
# CLIP's text encoder was trained on at most 77 tokens (start and end tokens included).
_CLIP_MAX_TOKENS = 77


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


_SPLITTERS: Mapping[str, Splitter] = MappingProxyType({"rule": split_sub_sentences})


def get_splitter(name: str = "rule") -> Splitter:
    """The splitter registered under ``name`` (DAMA.md section 1.1 [decision]: ``rule`` by default).

    An LLM splitter is added by listing it in ``_SPLITTERS``; :class:`ClipHardnessScorer` also accepts any
    :class:`Splitter` object directly.
    """
    try:
        return _SPLITTERS[name]
    except KeyError:
        raise ValueError(f"unknown splitter {name!r}; choose one of {sorted(_SPLITTERS)}") from None


def _pieces_or_whole(splitter: Splitter, text: str) -> list[str]:
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
# Section 1.2: the CLIP scorer
# --------------------------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}") from None


def _pooled(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_*_features`` (a tensor in older transformers, an output object in 5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _row_label(row: PreferenceRow, position: int) -> str:
    number = row.row_number or position + 1
    return f"row {number} (id {row.row_id!r})"


class ClipHardnessScorer:
    """Scores preference pairs with CLIP, sub-sentence by sub-sentence (DAMA.md sections 1.1-1.2).

    Each pair is scored against its row's **first** image (rows with several images are rare in preference data;
    the first is the one the question is about). A row without an image is an error.
    """

    def __init__(
        self,
        model: CLIPModel,
        processor: CLIPProcessor,
        *,
        name: str,
        splitter: Splitter | str = "rule",
        aggregation: str = "joint_softmax",
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}")
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.splitter: Splitter = get_splitter(splitter) if isinstance(splitter, str) else splitter
        self.aggregation = aggregation
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        text_positions = int(getattr(model.config.text_config, "max_position_embeddings", _CLIP_MAX_TOKENS))
        self.max_text_tokens = min(_CLIP_MAX_TOKENS, text_positions)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_SCORER,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        splitter: Splitter | str = "rule",
        aggregation: str = "joint_softmax",
    ) -> ClipHardnessScorer:
        """Load ``CLIPModel`` and ``CLIPProcessor`` from a hub name or a local folder.

        Args:
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available).
            dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``; cosines are computed in float32.
        """
        from transformers import CLIPModel, CLIPProcessor

        torch_dtype = _resolve_dtype(dtype)
        model = CLIPModel.from_pretrained(str(name_or_path), dtype=torch_dtype)
        processor = CLIPProcessor.from_pretrained(str(name_or_path))
        model.to(_resolve_device(device))  # type: ignore[arg-type]
        return cls(model, processor, name=str(name_or_path), splitter=splitter, aggregation=aggregation)

    def _sub_sentences(self, rows: Sequence[PreferenceRow]) -> tuple[list[str], list[int], list[int]]:
        texts: list[str] = []
        chosen_counts: list[int] = []
        rejected_counts: list[int] = []
        for row in rows:
            chosen = _pieces_or_whole(self.splitter, row.chosen)
            rejected = _pieces_or_whole(self.splitter, row.rejected)
            texts += chosen + rejected
            chosen_counts.append(len(chosen))
            rejected_counts.append(len(rejected))
        return texts, chosen_counts, rejected_counts

    @torch.inference_mode()
    def _score_batch(self, rows: Sequence[PreferenceRow]) -> torch.Tensor:
        images = [row.images[0].load() for row in rows]
        pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = _pooled(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))

        texts, chosen_counts, rejected_counts = self._sub_sentences(rows)
        pair_index, is_chosen = flat_index(chosen_counts, rejected_counts)
        pair_index, is_chosen = pair_index.to(self.device), is_chosen.to(self.device)
        if texts:
            tokens = self.processor.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
            ).to(self.device)
            text_embeds = _pooled(
                self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            )
            image_unit = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
            text_unit = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
            cosine = (text_unit * image_unit[pair_index]).sum(dim=-1)
        else:
            cosine = torch.zeros(0, device=self.device)
        logit_scale = self.model.logit_scale.float().exp()
        delta = aggregate(
            self.aggregation,
            cosine=cosine,
            logit_scale=logit_scale,
            pair_index=pair_index,
            is_chosen=is_chosen,
            num_pairs=len(rows),
        )
        return delta.cpu()

    def score_pairs(
        self,
        rows: Sequence[PreferenceRow],
        *,
        batch_size: int = 32,
        progress: ProgressCallback | None = None,
    ) -> torch.Tensor:
        """``delta_i`` for every pair (DAMA.md section 1.2), as a (N,) float32 CPU tensor.

        Per batch of ``batch_size`` pairs: one image forward (one image per pair) and one text forward over all
        sub-sentences of the batch, truncated to CLIP's 77 tokens. Results do not depend on ``batch_size``
        beyond floating-point noise. An answer that the splitter leaves without pieces is scored as its whole
        trimmed text; a blank answer contributes zero (see :func:`joint_softmax`).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for position, row in enumerate(rows):
            if not row.images:
                raise ValueError(
                    f"{_row_label(row, position)} has no image; CLIP hardness needs one. Add the image or give "
                    "every row chosen_score/rejected_score or hardness instead"
                )
        deltas: list[torch.Tensor] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            deltas.append(self._score_batch(batch))
            if progress is not None:
                progress(start + len(batch), len(rows))
        return torch.cat(deltas) if deltas else torch.zeros(0)


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
                first_missing = _row_label(row, position)
            continue
        if not math.isfinite(value):
            raise ValueError(f"{_row_label(row, position)} has a non-finite hardness score ({value})")
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


class HardnessSettings(Protocol):
    """What :func:`describe_hardness` reads (``HardnessConfig`` or the engine config's ``hardness`` section)."""

    @property
    def scorer(self) -> str: ...
    @property
    def aggregation(self) -> str: ...
    @property
    def rescale(self) -> str: ...


def describe_hardness(rows: Sequence[PreferenceRow], settings: HardnessSettings) -> str:
    """Where ``delta`` came from and its scale, for the model card: CLIP and its aggregation, or user scores and
    whether ``hardness.rescale`` mapped them onto [-1, 1]."""
    if user_hardness(rows) is None:
        scale = "[-1, 1]" if settings.aggregation == "joint_softmax" else "[-2, 2]"
        return f"CLIP `{settings.scorer}`, {settings.aggregation} (delta in {scale})"
    if settings.rescale == "minmax":
        return "user-supplied scores, rescaled linearly onto [-1, 1] (hardness.rescale: minmax)"
    return "user-supplied scores, as given (hardness.rescale: none)"


# --------------------------------------------------------------------------------------------------------------
# Sections 1.2-1.3: the whole step, its result and its cache key
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardnessConfig:
    """How to compute ``delta_i`` (DAMA.md section 1). The defaults are DAMA.md's.

    Attributes:
        scorer: CLIP hub name or local folder (section 1.2; the paper's LLaVA-1.5 vision tower by default).
        aggregation: ``joint_softmax`` (section 1.2 [decision] default) or ``mean_cosine``.
        splitter: registered splitter name (section 1.1 [decision]: ``rule``).
        batch_size: pairs per CLIP forward.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        dtype: CLIP weights' dtype: ``float32``, ``float16`` or ``bfloat16``.
        rescale: user-supplied scores: ``none`` (as given) or ``minmax`` (onto [-1, 1], :func:`rescale_minmax`).
    """

    scorer: str = DEFAULT_SCORER
    aggregation: Aggregation = HARDNESS["aggregation"].default
    splitter: str = HARDNESS["splitter"].default
    batch_size: int = HARDNESS["batch_size"].default
    device: str = "auto"
    dtype: str = "float32"
    rescale: HardnessRescale = HARDNESS["rescale"].default

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"hardness.aggregation is {self.aggregation!r}; choose one of {list(AGGREGATIONS)}")
        if self.splitter not in _SPLITTERS:
            raise ValueError(f"hardness.splitter is {self.splitter!r}; choose one of {sorted(_SPLITTERS)}")
        if self.batch_size < 1:
            raise ValueError(f"hardness.batch_size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"hardness.dtype is {self.dtype!r}; choose one of {list(DTYPES)}")
        if self.rescale not in HARDNESS_RESCALES:
            raise ValueError(f"hardness.rescale is {self.rescale!r}; choose one of {list(HARDNESS_RESCALES)}")


@dataclass(frozen=True)
class HardnessResult:
    """Per-pair hardness of a dataset and its mean (DAMA.md sections 1.2-1.3).

    Attributes:
        delta: (N,) float32, ``delta_i`` in row order.
        mean: ``delta_bar``, the mean of ``delta`` over these rows (section 1.3: from the data, never fixed).
        source: ``"user"`` (section 1.5) or ``"clip:<scorer name or path>"``.
        aggregation: the aggregation used, or ``"user_scores"`` / ``"user_scores_minmax"`` for user-supplied
            scores as given / rescaled onto [-1, 1].
    """

    delta: torch.Tensor
    mean: float
    source: str
    aggregation: str

    def save(self, path: str | Path) -> None:
        """Write to ``.pt`` (torch) or ``.json`` (``delta`` as a list of floats)."""
        path = Path(path)
        payload: dict[str, Any] = {"mean": self.mean, "source": self.source, "aggregation": self.aggregation}
        if path.suffix == ".pt":
            torch.save({**payload, "delta": self.delta.detach().cpu()}, path)
        elif path.suffix == ".json":
            path.write_text(json.dumps({**payload, "delta": self.delta.tolist()}))
        else:
            raise ValueError(f"hardness file {path} must end in .pt or .json")

    @classmethod
    def load(cls, path: str | Path) -> HardnessResult:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".pt":
            payload = torch.load(path, map_location="cpu", weights_only=True)
            delta = payload["delta"].float()
        elif path.suffix == ".json":
            payload = json.loads(path.read_text())
            delta = torch.tensor(payload["delta"], dtype=torch.float32)
        else:
            raise ValueError(f"hardness file {path} must end in .pt or .json")
        return cls(
            delta=delta,
            mean=float(payload["mean"]),
            source=str(payload["source"]),
            aggregation=str(payload["aggregation"]),
        )


def compute_hardness(
    rows: Sequence[PreferenceRow],
    config: HardnessConfig,
    progress: ProgressCallback | None = None,
) -> HardnessResult:
    """``delta_i`` for every row and ``delta_bar`` (DAMA.md sections 1.2, 1.3, 1.5).

    User-supplied scores win (section 1.5; no CLIP model is loaded then); otherwise CLIP ``config.scorer`` scores
    every pair. ``delta_bar`` is the mean over ``rows`` (section 1.3). ``config.rescale`` applies to user scores
    only: CLIP's ``joint_softmax`` already lies in [-1, 1].
    """
    if not rows:
        raise ValueError("no rows to compute hardness for")
    supplied = user_hardness(rows)
    if supplied is not None:
        delta, source, aggregation = supplied, "user", "user_scores"
        if config.rescale == "minmax":
            delta, aggregation = rescale_minmax(supplied), "user_scores_minmax"
    else:
        scorer = ClipHardnessScorer.from_pretrained(
            config.scorer,
            device=config.device,
            dtype=config.dtype,
            splitter=config.splitter,
            aggregation=config.aggregation,
        )
        delta = scorer.score_pairs(rows, batch_size=config.batch_size, progress=progress)
        source, aggregation = f"clip:{config.scorer}", config.aggregation
    return HardnessResult(delta=delta, mean=float(delta.mean()), source=source, aggregation=aggregation)


def cache_key(rows: Sequence[PreferenceRow], config: HardnessConfig) -> str:
    """A sha256 hex digest that changes whenever the hardness of ``rows`` under ``config`` could change.

    Covers each row's id, answers, user scores and the sha256 of every image's bytes, plus the config fields that
    change the numbers (scorer, aggregation, splitter, dtype, rescale), the code version of the scoring path and,
    for a local scorer folder, every file in it (:func:`dama_engine.model_files.folder_identity`). ``batch_size`` and
    ``device`` are left out: they do not change the result beyond floating-point noise.
    """
    digest = hashlib.sha256()
    settings: dict[str, Any] = asdict(config)
    settings.pop("batch_size")
    settings.pop("device")
    settings["scorer_files"] = folder_identity(Path(config.scorer))
    settings["code"] = code_version("hardness")
    digest.update(json.dumps({"version": _CACHE_VERSION, **settings}, sort_keys=True).encode())
    for row in rows:
        fields = {
            "id": row.row_id,
            "chosen": row.chosen,
            "rejected": row.rejected,
            "scores": [row.chosen_score, row.rejected_score, row.hardness],
            "images": [hashlib.sha256(image.read_bytes()).hexdigest() for image in row.images],
        }
        digest.update(json.dumps(fields, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()
