"""The base-against-tuned table and chart of an evaluation's results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dama_engine.evaluation.metrics import BUCKETS

# ---------------------------------------------------------------------------------------------------------------
# Reporting: the base-vs-tuned table and the chart

# The rows of the table. results.json also carries ``hallucination_rate`` (AMBER's Hal), which under this
# matcher's rules equals ``chair_s`` (dama_engine.data.matcher): the table and the chart show it once, as chair_s.
GENERATIVE_METRICS: tuple[str, ...] = ("chair_s", "chair_i", "coverage", "mean_length")
POPE_METRICS: tuple[str, ...] = ("accuracy", "f1", "yes_ratio")  # per split; precision and recall: results.json


def comparison_table(results: dict[str, Any], *, base: str = "base") -> list[tuple[str, float | None, float | None]]:
    """``(metric, base, tuned)`` rows of a results dict (None where a model has no such value).

    The implicit-reward rows have no base value: the base is their reference (its own rewards are 0).
    ``base="plain_base"``: the same rows with the plain base model's values in the base column (results of a
    model tuned from a starting adapter); all None where the results have no such model.
    """
    rows: list[tuple[str, float | None, float | None]] = []
    generative = results.get("generative")
    if generative:
        tuned = generative.get("tuned") or {}
        base_summary = generative.get(base) or {}
        rows += [(name, base_summary.get(name), tuned.get(name)) for name in GENERATIVE_METRICS]
        pope = generative.get("pope") or {}
        base_pope, tuned_pope = pope.get(base) or {}, pope.get("tuned") or {}
        for split in pope.get("questions", {}):
            rows += [
                (
                    f"pope_{metric} [{split}]",
                    (base_pope.get(split) or {}).get(metric),
                    (tuned_pope.get(split) or {}).get(metric),
                )
                for metric in POPE_METRICS
            ]
    preference = results.get("preference")
    if preference:
        base_stats = preference.get(base)
        tuned_stats = preference.get("tuned")
        groups = ["overall", *(BUCKETS if preference["base"].get("buckets") else ())]
        for group in groups:
            base_block: dict[str, Any] = {}
            if base_stats:
                base_block = base_stats["overall"] if group == "overall" else base_stats["buckets"][group]
            tuned_block = None
            if tuned_stats:
                tuned_block = tuned_stats["overall"] if group == "overall" else tuned_stats["buckets"][group]
            suffix = "" if group == "overall" else f" [{group}]"
            rows.append(
                (
                    f"logp_accuracy{suffix}",
                    base_block.get("logp_accuracy"),
                    tuned_block and tuned_block["logp_accuracy"],
                )
            )
        implicit = preference.get("implicit_reward")
        if implicit:
            for group in ["overall", *(BUCKETS if implicit.get("buckets") else ())]:
                block = implicit["overall"] if group == "overall" else implicit["buckets"][group]
                suffix = "" if group == "overall" else f" [{group}]"
                rows += [
                    (f"reward_accuracy{suffix}", None, block["accuracy"]),
                    (f"reward_margin{suffix}", None, block["margin"]),
                ]
            rows.append(("dpo_loss", None, implicit["overall"]["loss"]))
    return rows


def plot_evaluation(results: dict[str, Any], out_png: Path) -> Path:
    """Four panels: CHAIR metrics base vs tuned; POPE's F1 per split; preference accuracy per hardness bucket (base
    and tuned log-prob accuracy, tuned implicit-reward accuracy); tuned reward margin per bucket. Panels without
    data say so."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    generative, preference = results.get("generative"), results.get("preference")

    def bars(
        axis: Any, labels: list[str], series: dict[str, list[float | None]], title: str, *, rates: bool = True
    ) -> None:
        axis.set_title(title)
        if not labels or not any(v is not None for values in series.values() for v in values):
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
            axis.set_xticks([])
            return
        width = 0.8 / max(len(series), 1)
        for offset, (name, values) in enumerate(series.items()):
            positions = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(labels))]
            heights = [math.nan if v is None else v for v in values]
            axis.bar(positions, heights, width, label=name)
        axis.set_xticks(range(len(labels)), labels)
        axis.grid(axis="y", alpha=0.3)
        axis.axhline(0, color="black", linewidth=0.6)
        if rates:
            axis.set_ylim(0, 1.15)
        axis.legend(loc="upper right", fontsize=8)

    rates = ["chair_s", "chair_i", "coverage"]
    base_name = "base + start" if results.get("init_adapter") else "base"  # tuned from a starting adapter
    gen_series: dict[str, list[float | None]] = {}
    if generative:
        if generative.get("plain_base"):
            gen_series["plain base"] = [generative["plain_base"][name] for name in rates]
        gen_series[base_name] = [generative["base"][name] for name in rates]
        if generative.get("tuned"):
            gen_series["tuned"] = [generative["tuned"][name] for name in rates]
    rate_labels = ["CHAIRs", "CHAIRi", "Cover"]
    bars(axes[0], rate_labels if generative else [], gen_series, "object hallucination (lower CHAIR is better)")
    pope = (generative or {}).get("pope") or {}
    splits = list(pope.get("questions", {}))
    pope_series = {
        label: [pope[which][split]["f1"] for split in splits]
        for which, label in (("plain_base", "plain base"), ("base", base_name), ("tuned", "tuned"))
        if pope.get(which)
    }
    bars(axes[1], splits, pope_series, "POPE F1 by split (higher is better)")

    groups: list[str] = []
    group_labels: list[str] = []
    accuracy_series: dict[str, list[float | None]] = {}
    margin_series: dict[str, list[float | None]] = {}
    if preference:
        groups = ["overall", *(BUCKETS if preference["base"].get("buckets") else ())]

        def pick(stats: dict[str, Any] | None, group: str, key: str) -> float | None:
            if not stats:
                return None
            block = stats["overall"] if group == "overall" else (stats.get("buckets") or {}).get(group)
            return None if block is None else block.get(key)

        group_labels = [f"{g}\n(n={pick(preference['base'], g, 'count')})" for g in groups]
        if preference.get("plain_base"):
            accuracy_series["plain base log-prob"] = [
                pick(preference["plain_base"], g, "logp_accuracy") for g in groups
            ]
        accuracy_series[f"{base_name} log-prob"] = [pick(preference["base"], g, "logp_accuracy") for g in groups]
        if preference.get("tuned"):
            accuracy_series["tuned log-prob"] = [pick(preference["tuned"], g, "logp_accuracy") for g in groups]
        if preference.get("implicit_reward"):
            implicit = preference["implicit_reward"]
            accuracy_series["tuned implicit reward"] = [pick(implicit, g, "accuracy") for g in groups]
            margin_series[f"tuned vs {base_name}"] = [pick(implicit, g, "margin") for g in groups]
    bars(axes[2], group_labels, accuracy_series, "preference accuracy by hardness")
    margin_labels = group_labels if margin_series else []
    bars(axes[3], margin_labels, margin_series, "tuned reward margin by hardness (beta-scaled)", rates=False)

    adapter = results.get("adapter")
    figure.suptitle(f"{results.get('model', '')}" + (f"  vs  {adapter}" if adapter else ""), fontsize=9)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png
