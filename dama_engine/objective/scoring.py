"""Computing data hardness for a dataset (shared/DAMA.md section 1): the CLIP scorer (section 1.2), the
user's own scores (section 1.5), the dataset mean, and the cache key of a computed result. The formulas are in
:mod:`dama_engine.objective.hardness`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dama_engine.data import PreferenceRow
from dama_engine.model_files import code_version, folder_identity
from dama_engine.objective.hardness import (
    SPLITTERS,
    Splitter,
    aggregate,
    flat_index,
    get_splitter,
    pieces_or_whole,
    rescale_minmax,
    row_label,
    user_hardness,
)
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
            chosen = pieces_or_whole(self.splitter, row.chosen)
            rejected = pieces_or_whole(self.splitter, row.rejected)
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
                    f"{row_label(row, position)} has no image; CLIP hardness needs one. Add the image or give "
                    "every row chosen_score/rejected_score or hardness instead"
                )
        deltas: list[torch.Tensor] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            deltas.append(self._score_batch(batch))
            if progress is not None:
                progress(start + len(batch), len(rows))
        return torch.cat(deltas) if deltas else torch.zeros(0)


class HardnessSection(Protocol):
    """A config's ``hardness`` section, training's (``dama_engine.config``) or an evaluation's, or a
    :class:`HardnessConfig`."""

    @property
    def scorer(self) -> str | None: ...
    @property
    def aggregation(self) -> Aggregation: ...
    @property
    def splitter(self) -> str: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def rescale(self) -> HardnessRescale: ...


def describe_hardness(rows: Sequence[PreferenceRow], settings: HardnessSection) -> str:
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

    @classmethod
    def from_settings(cls, settings: HardnessSection, *, device: str) -> HardnessConfig:
        """From a config's ``hardness`` section (training's or an evaluation's): every setting it has, the
        default scorer where it names none."""
        return cls(
            scorer=settings.scorer or DEFAULT_SCORER,
            aggregation=settings.aggregation,
            splitter=settings.splitter,
            batch_size=settings.batch_size,
            device=device,
            rescale=settings.rescale,
        )

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"hardness.aggregation is {self.aggregation!r}; choose one of {list(AGGREGATIONS)}")
        if self.splitter not in SPLITTERS:
            raise ValueError(f"hardness.splitter is {self.splitter!r}; choose one of {sorted(SPLITTERS)}")
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


def hardness_cache_key(rows: Sequence[PreferenceRow], config: HardnessConfig) -> str:
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
