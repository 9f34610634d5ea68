"""The guard on DAMA's data-aware factor (issue 25's mechanism experiment, small): on the two-level hardness world,
``dama_data`` with the true hardness moves the easy/hard training-gap ratio away from what the same run with the
hardness shuffled across rows gives, in the direction the experiment measured (a larger beta on easy pairs widens
their gap while the loss is unsaturated).

Measured at this size (100 training pairs per level, 60 steps, seeds 0-4, ``benchmarks/mechanism.py --arms
"dpo,dama_data,dama_data (shuffled hardness)" --train-per-level 100 --eval-per-level 8 --steps 60``): ratio with
the true hardness minus ratio with it shuffled +0.60 to +1.00 (mean +0.78); dpo minus shuffled (what alpha_D = 1
gives) -0.04 ± 0.10. :data:`MARGIN` is half the smallest true-hardness effect seen and three of those spreads above
zero: an ignored (alpha_D = 1) or inverted factor fails it.
"""

from __future__ import annotations

import json
from pathlib import Path

from dama_engine.proving import ProvingGround
from dama_engine.proving.mechanism import ARMS, SETTINGS, make_level_pairs, run_arm

MARGIN = 0.3
SIZE = {"train_per_level": 100, "eval_per_level": 8}
STEPS = 60


def _gap_ratio(figures: dict[str, dict[str, float]]) -> float:
    return figures["easy"]["train_gap"] / figures["hard"]["train_gap"]


def test_the_data_factor_widens_the_easy_hard_gap_beyond_shuffled_hardness(
    proving_ground: ProvingGround, tmp_path: Path
) -> None:
    world = make_level_pairs(tmp_path / "world", seed=1000, **SIZE)
    shuffled = [json.loads(line)["hardness"] for line in world.train_shuffled.read_text().splitlines()]
    true = [json.loads(line)["hardness"] for line in world.train.read_text().splitlines()]
    assert sorted(shuffled) == sorted(true) and shuffled != true  # the same values, other rows
    settings = {**SETTINGS, "steps": STEPS}
    ratios = {
        name: _gap_ratio(run_arm(proving_ground.base, world, ARMS[name], 0, tmp_path / str(i), settings)["levels"])
        for i, name in enumerate(("dama_data", "dama_data (shuffled hardness)"))
    }
    assert ratios["dama_data"] - ratios["dama_data (shuffled hardness)"] >= MARGIN, ratios
