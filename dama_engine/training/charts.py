"""PNG charts of a run: loss, reward margin, accuracy and beta over steps, held-out evaluations as points."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Held-out series per panel: (metric, legend). The implicit-reward ones (policy against reference) are drawn from
# step 1 on: before the first step the policy is the reference, so they are 0 by construction there. An sft run has
# no reference: its held-out accuracy is drawn as the log-prob series (eval_logp_accuracy) only.
HELD_OUT: dict[str, tuple[tuple[str, str], ...]] = {
    "loss": (("eval_loss", "held-out"),),
    "reward_margin": (("eval_margin", "held-out"),),
    "reward_accuracy": (
        ("eval_accuracy", "held-out, implicit reward"),
        ("eval_logp_accuracy", "held-out, log-prob (chosen likelier)"),
    ),
    "beta_mean": (),
}
IMPLICIT_REWARD = ("eval_accuracy", "eval_margin")


def held_out_series(records: list[dict[str, Any]], panel: str) -> list[tuple[str, list[tuple[float, float]], str]]:
    """``(legend, [(step, value)], matplotlib style)`` of each held-out series of a panel: markers at the evaluated
    steps, joined by a line only through three points or more."""
    series = []
    for key, legend in HELD_OUT[panel]:
        points = []
        for record in records:
            implicit = "eval_rewards_chosen" in record and record["step"] > 0
            if key in record and (key not in IMPLICIT_REWARD or implicit):
                points.append((record["step"], record[key]))
        if points:
            series.append((legend, points, "o-" if len(points) >= 3 else "o"))
    return series


def plot_training(metrics_jsonl: Path, out_png: Path, *, title: str = "") -> Path:
    """Read ``metrics.jsonl`` (one JSON object per line with a ``step``) and draw a 2x2 chart. Held-out
    evaluations are markers at the steps they ran, joined by a line only when there are at least three."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    train: list[dict[str, Any]] = []
    held_out: list[dict[str, Any]] = []
    for line in metrics_jsonl.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (held_out if "eval_loss" in record else train).append(record)

    panels = [
        ("loss", "DPO loss"),
        ("reward_margin", "reward margin (implicit reward)"),
        ("reward_accuracy", "preference accuracy"),
        ("beta_mean", "beta (mean, min-max band)"),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    colours = ("tab:orange", "tab:green")
    for axis, (key, label) in zip(axes.flat, panels, strict=True):
        steps = [r["step"] for r in train if key in r]
        if steps:
            train_label = "train, implicit reward" if key == "reward_accuracy" else "train"
            axis.plot(steps, [r[key] for r in train if key in r], label=train_label, color="tab:blue")
        if key == "beta_mean" and steps:
            lows = [r.get("beta_min", r[key]) for r in train if key in r]
            highs = [r.get("beta_max", r[key]) for r in train if key in r]
            axis.fill_between(steps, lows, highs, alpha=0.2, color="tab:blue")
        for (legend, points, style), colour in zip(held_out_series(held_out, key), colours, strict=False):
            axis.plot(*zip(*points, strict=True), style, label=legend, color=colour)
        axis.set_title(label)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="best", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png
