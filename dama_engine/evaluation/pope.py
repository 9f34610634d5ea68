"""POPE (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large Vision-Language Models"): yes/no questions
about objects, half of them about objects the image holds and half about objects it does not. Torch-free: the
questions, the answer rule and the metrics; :mod:`.run` asks the models.

**Questions.** For every image of the generative set, ``"Is there a {entry} in the image?"`` for vocabulary entries
(names as the vocabulary writes them, possibly several words: ``red circle``):

* *present*: up to ``per_image`` of the image's true objects, drawn at random (the same ones in every split);
* *absent*: up to ``per_image`` entries a mention of which would hallucinate
  (:func:`dama_engine.data.grounded` is false for them), chosen per split:

  - ``random``: uniformly among the absent entries;
  - ``popular``: the absent entries grounded in the most images of the set (ties: by name);
  - ``adversarial``: the absent entries that co-occur most with the image's true objects, counted as
    ``sum over true objects o of #images where o and the entry are both grounded`` (ties: by frequency, then name).

An image with fewer true objects (or fewer absent entries) than ``per_image`` gets as many as it has. Everything is
drawn from ``random.Random`` seeded by ``(seed, image index, split)``: the same set, vocabulary and seed always give
the same questions.

**Answers** (POPE's rule): an answer is ``no`` when it holds the word ``no`` or ``not`` (whole words, any case), else
``yes``. Answers holding neither ``yes`` nor ``no``/``not`` are counted as ``unclear`` (they still count as ``yes``,
as in POPE): a model that rambles instead of answering shows up there.

**Metrics** per split, ``yes`` being the positive class: accuracy, precision ``TP / (TP + FP)``, recall
``TP / (TP + FN)``, F1 (0.0 where a denominator is 0), and the yes-ratio (share of answers that are ``yes``).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dama_engine.data import Vocabulary, grounded

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
QUESTION_TEMPLATE = "Is there a {entry} in the image?"

_NO = re.compile(r"(?<!\w)(?:no|not)(?!\w)", re.IGNORECASE)
_YES = re.compile(r"(?<!\w)yes(?!\w)", re.IGNORECASE)

Answer = Literal["yes", "no"]


@dataclass(frozen=True)
class PopeQuestion:
    image_index: int  # the sample's position in the generative set
    entry: str  # a vocabulary name
    present: bool  # the truth: the image holds it

    @property
    def text(self) -> str:
        return QUESTION_TEMPLATE.format(entry=self.entry)


def parse_answer(answer: str) -> tuple[Answer, bool]:
    """``("no" | "yes", unclear)``: POPE's rule (module docstring); ``unclear`` when the answer holds neither
    ``yes`` nor ``no``/``not``."""
    if _NO.search(answer):
        return "no", False
    return "yes", _YES.search(answer) is None


def _grounded_sets(objects: Sequence[Sequence[str]], vocabulary: Vocabulary) -> list[set[str]]:
    names = vocabulary.names
    sets = []
    for truth in objects:
        canonical = tuple(dict.fromkeys(vocabulary.canonical(name) for name in truth))
        sets.append({name for name in names if grounded(name, canonical, vocabulary)})
    return sets


def pope_questions(
    objects: Sequence[Sequence[str]], vocabulary: Vocabulary, *, seed: int = 0, per_image: int = 3
) -> dict[str, list[PopeQuestion]]:
    """The questions of each split (module docstring) for images whose true objects are ``objects`` (one list of
    vocabulary names or synonyms per image), in image order, present ones first per image."""
    if per_image < 1:
        raise ValueError(f"per_image must be at least 1, got {per_image}")
    names = vocabulary.names
    present_sets = _grounded_sets(objects, vocabulary)
    frequency: Counter[str] = Counter(name for present in present_sets for name in present)
    co_occurrence: Counter[tuple[str, str]] = Counter(
        (first, second) for present in present_sets for first in present for second in present if first != second
    )
    questions: dict[str, list[PopeQuestion]] = {split: [] for split in SPLITS}
    for index, (truth, present) in enumerate(zip(objects, present_sets, strict=True)):
        canonical = list(dict.fromkeys(vocabulary.canonical(name) for name in truth))
        chosen_present = random.Random(f"pope:{seed}:{index}:present").sample(canonical, min(per_image, len(canonical)))
        absent = [name for name in names if name not in present]
        picks: dict[str, list[str]] = {
            "random": random.Random(f"pope:{seed}:{index}:random").sample(sorted(absent), min(per_image, len(absent))),
            "popular": sorted(absent, key=lambda name: (-frequency[name], name))[:per_image],
            "adversarial": sorted(
                absent,
                key=lambda name: (-sum(co_occurrence[(true, name)] for true in canonical), -frequency[name], name),
            )[:per_image],
        }
        for split in SPLITS:
            questions[split] += [PopeQuestion(index, entry, True) for entry in chosen_present]
            questions[split] += [PopeQuestion(index, entry, False) for entry in picks[split]]
    return questions


def pope_metrics(present: Sequence[bool], answers: Sequence[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio of ``answers`` to questions whose truth is ``present``, with
    the confusion counts and how many answers were unclear (module docstring)."""
    if len(present) != len(answers):
        raise ValueError(f"pope_metrics: {len(present)} questions but {len(answers)} answers")
    parsed = [parse_answer(answer) for answer in answers]
    tp = sum(1 for truth, (said, _) in zip(present, parsed, strict=True) if truth and said == "yes")
    fp = sum(1 for truth, (said, _) in zip(present, parsed, strict=True) if not truth and said == "yes")
    tn = sum(1 for truth, (said, _) in zip(present, parsed, strict=True) if not truth and said == "no")
    fn = len(present) - tp - fp - tn
    n = len(present)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "questions": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unclear": sum(1 for _, unclear in parsed if unclear),
    }
