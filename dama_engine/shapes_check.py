"""Validate the shapes world before training on it: its pairs carry no text-only cue.

:func:`text_only_check` trains a model that never sees an image (a logistic regression on which word stands in
which place of each answer: the strongest text-only reader of these fixed-structure sentences) to tell the chosen
answer from the rejected one on the training pairs, and reports its held-out accuracy per difficulty bucket. A
world whose pairs can only be told apart by looking keeps it at chance (0.5) in every bucket; a length cue, a
vocabulary cue (e.g. rejected answers naming a colour the chosen ones rarely do) or a structure cue would lift it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dama_engine.data.rows import PreferenceRow


@dataclass(frozen=True)
class TextOnlyReport:
    """Held-out accuracy of the text-only model overall and per bucket (``None`` bucket key: rows without one)."""

    overall: float
    per_bucket: dict[str, float]
    counts: dict[str, int]
    train_accuracy: float


def _features(answers: Sequence[str], vocabulary: dict[tuple[int, str], int]) -> torch.Tensor:
    rows = torch.zeros(len(answers), len(vocabulary) + 1)
    for index, answer in enumerate(answers):
        words = answer.lower().rstrip(".").replace(",", "").split()
        for place, word in enumerate(words):
            column = vocabulary.get((place, word))
            if column is not None:
                rows[index, column] = 1.0
        rows[index, -1] = len(words) / 20.0  # length, so a length cue would show
    return rows


def text_only_check(
    train: Sequence[PreferenceRow], held_out: Sequence[PreferenceRow], *, seed: int = 0, steps: int = 300
) -> TextOnlyReport:
    """Fit the text-only model on ``train`` and score it on ``held_out`` (pairs shown in a random order)."""
    generator = torch.Generator().manual_seed(seed)
    vocabulary: dict[tuple[int, str], int] = {}
    for row in train:
        for answer in (row.chosen, row.rejected):
            for place, word in enumerate(answer.lower().rstrip(".").replace(",", "").split()):
                vocabulary.setdefault((place, word), len(vocabulary))

    def design(rows: Sequence[PreferenceRow]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = _features([row.chosen for row in rows], vocabulary)
        rejected = _features([row.rejected for row in rows], vocabulary)
        first_is_chosen = torch.rand(len(rows), generator=generator) < 0.5
        first = torch.where(first_is_chosen[:, None], chosen, rejected)
        second = torch.where(first_is_chosen[:, None], rejected, chosen)
        return first - second, first_is_chosen.float()

    x_train, y_train = design(train)
    x_held, y_held = design(held_out)
    weights = torch.zeros(x_train.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x_train @ weights, y_train)
        (loss + 1e-3 * weights.square().sum()).backward()
        optimizer.step()
    with torch.no_grad():
        train_correct = ((x_train @ weights > 0).float() == y_train).float()
        correct = ((x_held @ weights > 0).float() == y_held).float()
    by_bucket: dict[str, list[float]] = defaultdict(list)
    for row, value in zip(held_out, correct.tolist(), strict=True):
        by_bucket[str(row.meta.get("bucket"))].append(value)
    return TextOnlyReport(
        overall=float(correct.mean()),
        per_bucket={name: sum(values) / len(values) for name, values in sorted(by_bucket.items())},
        counts={name: len(values) for name, values in sorted(by_bucket.items())},
        train_accuracy=float(train_correct.mean()),
    )
