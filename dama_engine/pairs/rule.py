"""Which two of a prompt's sampled answers make its preference pair, and each answer's score. Torch-free.

Each sample is judged with the CHAIR matcher (:func:`dama_engine.data.judge_response`) against its image's true
objects. The rule (issue 22, as RLAIF-V and the DAMA paper build on-policy pairs):

* **chosen**: among the *faithful* samples (no hallucinated object, a non-empty answer), the one covering most true
  objects; ties go to the earliest sample.
* **rejected**: among the *hallucinating* samples (at least one hallucinated object), the one closest to the chosen
  one in length (whitespace words, then characters); ties go to the earliest sample. Close lengths keep the pair
  about what is said, not how much.
* A prompt without a faithful sample or without a hallucinating one makes no pair.

**Score** of a sample: ``(covered true objects - hallucinated objects) / true objects`` (the counts of
:class:`~dama_engine.data.ChairSample`: distinct objects; the divisor is 1 for an image without true objects). The
pair stores them as ``chosen_score`` / ``rejected_score``, so DAMA's data-aware factor (shared/DAMA.md section 1.5)
reads ``delta_i = chosen_score - rejected_score`` without CLIP (``hardness.rescale`` applies as to any user scores).
"""

from __future__ import annotations

from collections.abc import Sequence

from dama_engine.data import ChairSample


def sample_score(judgement: ChairSample) -> float:
    """``(covered - hallucinated) / true objects`` (module docstring)."""
    return (len(judgement.covered) - len(judgement.hallucinated)) / max(len(judgement.objects), 1)


def is_faithful(judgement: ChairSample) -> bool:
    return not judgement.hallucinated and bool(judgement.response.strip())


def choose_pair(judged: Sequence[ChairSample]) -> tuple[int, int] | None:
    """``(chosen, rejected)`` positions in ``judged`` by the rule of the module docstring, or None (no pair)."""
    faithful = [index for index, judgement in enumerate(judged) if is_faithful(judgement)]
    hallucinating = [index for index, judgement in enumerate(judged) if judgement.hallucinated]
    if not faithful or not hallucinating:
        return None
    chosen = min(faithful, key=lambda index: (-len(judged[index].covered), index))
    words, characters = judged[chosen].words, len(judged[chosen].response)
    rejected = min(
        hallucinating,
        key=lambda index: (abs(judged[index].words - words), abs(len(judged[index].response) - characters), index),
    )
    return chosen, rejected
