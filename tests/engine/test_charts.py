"""The training chart's held-out series: real evaluations as points, labelled by which accuracy they are."""

from __future__ import annotations

import json
from pathlib import Path

from dama_engine.training.charts import held_out_series, plot_training


def _preference_eval(step: int, accuracy: float, logp_accuracy: float) -> dict[str, float]:
    return {
        "step": step,
        "eval_loss": 0.6,
        "eval_accuracy": accuracy,
        "eval_margin": accuracy / 2,
        "eval_rewards_chosen": 0.0,
        "eval_logp_accuracy": logp_accuracy,
        "eval_logp_margin": 1.0,
    }


def test_held_out_accuracy_is_drawn_at_the_evaluated_steps_with_its_kind_named() -> None:
    records = [_preference_eval(0, 0.0, 0.7), _preference_eval(25, 0.6, 0.75), _preference_eval(50, 0.8, 0.8)]
    series = {legend: (points, style) for legend, points, style in held_out_series(records, "reward_accuracy")}
    # The implicit reward before the first step is 0 by construction (policy = reference): not drawn.
    assert series["held-out, implicit reward"] == ([(25, 0.6), (50, 0.8)], "o")
    assert series["held-out, log-prob (chosen likelier)"] == ([(0, 0.7), (25, 0.75), (50, 0.8)], "o-")
    assert held_out_series(records, "reward_margin") == [("held-out", [(25, 0.3), (50, 0.4)], "o")]


def test_an_sft_runs_held_out_accuracy_is_its_log_prob_accuracy_from_step_zero() -> None:
    """Without a reference (sft) there is no implicit reward: eval_accuracy is the log-prob accuracy."""
    records = [
        {"step": s, "eval_loss": 1.0, "eval_accuracy": a, "eval_margin": 0.1, "eval_logp_accuracy": a}
        for s, a in ((0, 0.5), (9, 0.6))
    ]
    expected = [("held-out, log-prob (chosen likelier)", [(0, 0.5), (9, 0.6)], "o")]
    assert held_out_series(records, "reward_accuracy") == expected
    assert held_out_series(records, "reward_margin") == []


def test_plot_training_writes_a_chart(tmp_path: Path) -> None:
    lines = [
        {"step": s, "loss": 0.7 - s / 100, "reward_margin": s / 10, "reward_accuracy": 0.6, "beta_mean": 0.1}
        for s in (10, 20)
    ]
    lines += [_preference_eval(0, 0.0, 0.6), _preference_eval(20, 0.7, 0.8)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert plot_training(metrics, tmp_path / "chart.png").stat().st_size > 10_000
