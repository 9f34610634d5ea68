"""Preference metrics by hardness bucket (shared/DAMA.md sections 1 and 3) and the policy's own log-prob
accuracy.

**Preference metrics** (:func:`preference_metrics`): DPO loss, accuracy and reward margin with the base beta
(section 3), overall and per hardness bucket: ``hard`` when ``delta < low``, ``easy`` when ``delta > high``,
``medium`` otherwise (section 1: larger delta = easier pair), with ``(low, high)`` given or, by default, the
tertiles of the data's delta (linear interpolation between order statistics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dama_engine.objective import ObjectiveConfig, preference_loss

BUCKETS: tuple[str, ...] = ("easy", "medium", "hard")


# ---------------------------------------------------------------------------------------------------------------
# Preference metrics by hardness bucket

FloatsLike = torch.Tensor | Sequence[float]


@dataclass(frozen=True)
class HardnessBuckets:
    """Each pair's bucket (``easy`` / ``medium`` / ``hard``) and the thresholds that made them."""

    labels: tuple[str, ...]
    low: float
    high: float
    source: Literal["tertiles", "given"]

    def members(self, bucket: str) -> list[int]:
        return [index for index, label in enumerate(self.labels) if label == bucket]

    def counts(self) -> dict[str, int]:
        return {bucket: self.labels.count(bucket) for bucket in BUCKETS}

    def describe(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "thresholds_source": self.source,
            "rule": "hard: delta < low; medium: low <= delta <= high; easy: delta > high",
            "counts": self.counts(),
        }


def _as_float64(values: FloatsLike, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return tensor


def bucket_by_hardness(delta: FloatsLike, thresholds: tuple[float, float] | None = None) -> HardnessBuckets:
    """Put each pair in ``hard`` (delta < low), ``medium`` or ``easy`` (delta > high) (shared/DAMA.md section 1).

    Args:
        delta: (N,) per-pair data hardness ``delta_i``; larger is easier.
        thresholds: ``(low, high)`` with ``low <= high``; default: the 1/3 and 2/3 quantiles of ``delta``.
    """
    values = _as_float64(delta, "delta")
    if values.numel() == 0:
        raise ValueError("bucket_by_hardness: no pairs")
    if thresholds is None:
        low, high = (float(q) for q in torch.quantile(values, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)))
        source: Literal["tertiles", "given"] = "tertiles"
    else:
        low, high = float(thresholds[0]), float(thresholds[1])
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"hardness thresholds must be finite with low <= high, got {thresholds}")
        source = "given"
    labels = tuple("hard" if value < low else "easy" if value > high else "medium" for value in values.tolist())
    return HardnessBuckets(labels=labels, low=low, high=high, source=source)


def _buckets(
    hardness: FloatsLike | HardnessBuckets | None, thresholds: tuple[float, float] | None, n: int
) -> HardnessBuckets | None:
    if hardness is None:
        return None
    if isinstance(hardness, HardnessBuckets):
        if thresholds is not None:
            raise ValueError("give thresholds or ready-made HardnessBuckets, not both")
        buckets = hardness
    else:
        buckets = bucket_by_hardness(hardness, thresholds)
    if len(buckets.labels) != n:
        raise ValueError(f"hardness has {len(buckets.labels)} values for {n} pairs")
    return buckets


def _dpo_block(logps: Sequence[torch.Tensor], beta: float) -> dict[str, float | None]:
    """One block of :func:`preference_metrics`; ``logps`` are policy chosen/rejected, reference chosen/rejected."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
    count = int(policy_chosen.numel())
    if count == 0:
        keys = ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected")
        return {"count": 0, **dict.fromkeys(keys)}
    # Plain DPO with the base beta, as held-out evaluation during training does (DAMA.md section 3).
    metrics = preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        config=ObjectiveConfig(method="dpo", beta=beta),
    ).metrics
    return {
        "count": count,
        "loss": metrics["loss"],
        "accuracy": metrics["reward_accuracy"],
        "margin": metrics["reward_margin"],
        "rewards_chosen": metrics["rewards_chosen"],
        "rewards_rejected": metrics["rewards_rejected"],
    }


def preference_metrics(
    policy_chosen: FloatsLike,
    policy_rejected: FloatsLike,
    ref_chosen: FloatsLike,
    ref_rejected: FloatsLike,
    beta: float,
    hardness: FloatsLike | HardnessBuckets | None = None,
    thresholds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Held-out DPO loss, preference accuracy and reward margin, overall and per hardness bucket.

    With ``R_i`` the implicit reward gap of shared/DAMA.md (notation): ``loss = mean -log sigma(beta R_i)``,
    ``margin = mean beta R_i``, ``accuracy = share of R_i > 0``; rewards as in section 3.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (N,) summed log-probs of each pair's answers
            under the policy (tuned) and the reference (base) model.
        beta: the base beta.
        hardness: (N,) per-pair ``delta_i`` (or :class:`HardnessBuckets`); omitted: no buckets.
        thresholds: ``(low, high)`` for :func:`bucket_by_hardness`; default: the tertiles of ``hardness``.

    Returns:
        ``{"overall": block, "buckets": {"easy": block, "medium": block, "hard": block} | None,
        "thresholds": {...} | None}``; a block has ``count, loss, accuracy, margin, rewards_chosen,
        rewards_rejected`` (None in an empty bucket).
    """
    tensors = [
        _as_float64(values, name)
        for values, name in (
            (policy_chosen, "policy_chosen"),
            (policy_rejected, "policy_rejected"),
            (ref_chosen, "ref_chosen"),
            (ref_rejected, "ref_rejected"),
        )
    ]
    n = tensors[0].numel()
    if any(tensor.numel() != n for tensor in tensors):
        raise ValueError("preference_metrics: the four log-prob tensors must have the same length")
    if n == 0:
        raise ValueError("preference_metrics: no pairs")
    buckets = _buckets(hardness, thresholds, n)
    result: dict[str, Any] = {"overall": _dpo_block(tensors, beta), "buckets": None, "thresholds": None}
    if buckets is not None:
        result["buckets"] = {
            bucket: _dpo_block([tensor[buckets.members(bucket)] for tensor in tensors], beta) for bucket in BUCKETS
        }
        result["thresholds"] = buckets.describe()
    return result


def _logprob_block(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float | None]:
    count = int(chosen.numel())
    if count == 0:
        return {"count": 0, **dict.fromkeys(("logp_chosen", "logp_rejected", "logp_margin", "logp_accuracy"))}
    return {
        "count": count,
        "logp_chosen": float(chosen.mean()),
        "logp_rejected": float(rejected.mean()),
        "logp_margin": float((chosen - rejected).mean()),
        "logp_accuracy": float((chosen > rejected).double().mean()),
    }


def logprob_stats(
    chosen: FloatsLike,
    rejected: FloatsLike,
    hardness: FloatsLike | HardnessBuckets | None = None,
    thresholds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One model's own view of the pairs, without a reference: mean summed log-probs of the chosen and rejected
    answers, their mean difference, and ``logp_accuracy`` (share of pairs whose chosen answer is the likelier).

    Summed log-probs favour shorter answers, so compare models on the same pairs, not pairs with each other.
    Buckets as in :func:`preference_metrics`.
    """
    chosen_t, rejected_t = _as_float64(chosen, "chosen"), _as_float64(rejected, "rejected")
    if chosen_t.numel() != rejected_t.numel():
        raise ValueError("logprob_stats: chosen and rejected must have the same length")
    buckets = _buckets(hardness, thresholds, chosen_t.numel())
    result: dict[str, Any] = {"overall": _logprob_block(chosen_t, rejected_t), "buckets": None}
    if buckets is not None:
        result["buckets"] = {
            bucket: _logprob_block(chosen_t[buckets.members(bucket)], rejected_t[buckets.members(bucket)])
            for bucket in BUCKETS
        }
    return result
