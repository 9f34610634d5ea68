"""PNG charts of a run: loss, reward margin, accuracy and beta over steps (held-out points overlaid)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training(metrics_jsonl: Path, out_png: Path, *, title: str = "") -> Path:
    """Read ``metrics.jsonl`` (one JSON object per line with a ``step``) and draw a 2x2 chart."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    train: list[dict[str, float]] = []
    held_out: list[dict[str, float]] = []
    for line in metrics_jsonl.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (held_out if "eval_loss" in record else train).append(record)

    panels = [
        ("loss", "eval_loss", "DPO loss"),
        ("reward_margin", "eval_margin", "reward margin"),
        ("reward_accuracy", "eval_accuracy", "preference accuracy"),
        ("beta_mean", None, "beta (mean, min-max band)"),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for axis, (key, eval_key, label) in zip(axes.flat, panels, strict=True):
        steps = [r["step"] for r in train if key in r]
        if steps:
            axis.plot(steps, [r[key] for r in train if key in r], label="train", color="tab:blue")
        if key == "beta_mean" and steps:
            lows = [r.get("beta_min", r[key]) for r in train if key in r]
            highs = [r.get("beta_max", r[key]) for r in train if key in r]
            axis.fill_between(steps, lows, highs, alpha=0.2, color="tab:blue")
        if eval_key:
            points = [(r["step"], r[eval_key]) for r in held_out if eval_key in r]
            if points:
                axis.plot(*zip(*points, strict=True), "o-", label="held-out", color="tab:orange")
        axis.set_title(label)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png
