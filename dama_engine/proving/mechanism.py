"""The mechanism experiment: does DAMA's data-aware factor rebalance easy and hard pairs, as the paper claims?

A world of preference pairs at two controlled hardness levels, everything else held fixed: every scene has three
objects; an **easy** pair's rejected answer gets all three colours wrong, each to a far colour (two or three steps
away on the colour circle); a **hard** pair's gets one colour wrong, to a neighbouring colour. Both answers have the
same words in the same places (:mod:`dama_engine.proving.shapes`' swap pairs). Pairs whose swap touches the seeing
base's planted confusion (orange <-> red) are left out, so the base's bias stays out of the comparison. Each row
carries its level and its oracle hardness ``delta`` (:func:`dama_engine.proving.shapes.oracle_hardness`: about
0.76 for easy, 0.10 for hard), given to the objective as user scores with ``hardness.rescale: minmax`` so that
``beta_i`` spans the widest range the formula allows (DAMA.md section 1.5). A copy of the training rows with the
hardness shuffled across rows is the control that separates "uses hardness" from "changes beta".

Every arm trains a LoRA (projector too) on the proving ground's seeing base from the same pairs, seed and settings
(:data:`SETTINGS`); then the base and the tuned model score every training and held-out pair
(:func:`dama_engine.evaluation.run_evaluation`) and :func:`level_figures` reduces the scores per level: the mean
implicit reward gap on the training pairs, held-out implicit-reward and log-prob accuracy, and the change of the
chosen answer's log-prob (likelihood displacement: negative when training lowers the preferred answer too).
``benchmarks/mechanism.py`` runs the arms over seeds and reports the premise, the paired statistics and the
kept-share of the model-aware filter.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dama_engine.proving.shapes import PROMPTS, describe_scene, draw_scene, oracle_hardness, sample_pair

LEVELS: dict[str, tuple[int, str]] = {"easy": (3, "far_colour"), "hard": (1, "near_colour")}
"""Level -> (wrong objects, swap kind) of :func:`dama_engine.proving.shapes.sample_pair`."""
PLANTED = frozenset({"orange", "red"})  # the seeing base's planted confusion: pairs that swap one for the other go
OBJECTS = 3
IMAGE_SIZE = 32  # the proving ground's
WIDE_SIGMA = 5.0  # a filter width at which the Gaussian keeps almost every pair (the proving ground's setting)
RELEASED_SIGMA = 1.0  # the released code's

SETTINGS: dict[str, Any] = {"beta": 0.1, "learning_rate": 1e-4, "steps": 150, "batch_size": 16, "lora_r": 16}
"""The training settings of every arm (chosen and explained in benchmarks/mechanism.py's docstring)."""

ARMS: dict[str, dict[str, Any]] = {
    "dpo": {"method": "dpo"},
    "dama_data": {"method": "dama_data"},
    "dama_data (shuffled hardness)": {"method": "dama_data", "shuffled": True},
    f"dama_model (sigma {RELEASED_SIGMA:g})": {"method": "dama_model", "filter_sigma": RELEASED_SIGMA},
    f"dama_model (sigma {WIDE_SIGMA:g})": {"method": "dama_model", "filter_sigma": WIDE_SIGMA},
    f"dama (sigma {RELEASED_SIGMA:g})": {"method": "dama", "filter_sigma": RELEASED_SIGMA},
    f"dama (sigma {WIDE_SIGMA:g})": {"method": "dama", "filter_sigma": WIDE_SIGMA},
}


@dataclass(frozen=True)
class LevelWorld:
    """Where :func:`make_level_pairs` wrote one seed's pairs."""

    root: Path
    train: Path  # the training pairs (true hardness)
    train_shuffled: Path  # the same rows, hardness shuffled across them
    eval: Path  # held-out pairs
    score: Path  # training and held-out pairs together: what each arm's evaluation scores
    levels: dict[str, tuple[str, str]]  # row id -> (split, level)


def _touches_planted(scene: list[Any], rejected: list[Any]) -> bool:
    return any({truth.colour, said.colour} == PLANTED for truth, said in zip(scene, rejected, strict=True))


def _level_pair(rng: random.Random, level: str) -> tuple[list[Any], list[Any]]:
    wrong, swap = LEVELS[level]
    while True:
        scene, rejected = sample_pair(rng, wrong, swap)
        if len(scene) == OBJECTS and not _touches_planted(scene, rejected):
            return scene, rejected


def make_level_pairs(
    out_dir: Path, *, seed: int, train_per_level: int, eval_per_level: int, image_size: int = IMAGE_SIZE
) -> LevelWorld:
    """Write one seed's pairs (levels interleaved) into ``out_dir``; the same seed gives the same files."""
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, Any]]] = {}
    levels: dict[str, tuple[str, str]] = {}
    for split, per_level in (("train", train_per_level), ("eval", eval_per_level)):
        rows = []
        for index in range(per_level * len(LEVELS)):
            level = list(LEVELS)[index % len(LEVELS)]
            scene, rejected = _level_pair(rng, level)
            image = f"images/{split}_{index:05d}.png"
            draw_scene(scene, rng, image_size).save(root / image, format="PNG")
            row_id = f"{split}-{index:05d}"
            rows.append(
                {
                    "id": row_id,
                    "prompt": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rng.choice(PROMPTS)}]}
                    ],
                    "chosen": [{"role": "assistant", "content": describe_scene(scene)}],
                    "rejected": [{"role": "assistant", "content": describe_scene(rejected)}],
                    "images": [image],
                    "level": level,
                    "hardness": round(oracle_hardness(scene, rejected), 6),
                }
            )
            levels[row_id] = (split, level)
        splits[split] = rows
    shuffled_hardness = [row["hardness"] for row in splits["train"]]
    random.Random(seed + 1).shuffle(shuffled_hardness)
    shuffled = [{**row, "hardness": value} for row, value in zip(splits["train"], shuffled_hardness, strict=True)]
    files = {
        "train": splits["train"],
        "train_shuffled": shuffled,
        "eval": splits["eval"],
        "score": splits["train"] + splits["eval"],
    }
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "levels.json").write_text(json.dumps(levels))
    return world_at(root)


def world_at(root: Path) -> LevelWorld:
    """The world :func:`make_level_pairs` wrote under ``root``."""
    levels = {key: (value[0], value[1]) for key, value in json.loads((root / "levels.json").read_text()).items()}
    return LevelWorld(
        root=root,
        train=root / "train.jsonl",
        train_shuffled=root / "train_shuffled.jsonl",
        eval=root / "eval.jsonl",
        score=root / "score.jsonl",
        levels=levels,
    )


def arm_config(
    base: Path, world: LevelWorld, arm: dict[str, Any], seed: int, output_dir: Path, settings: dict[str, Any]
) -> dict[str, Any]:
    """The engine config (a dict) of one arm's training run."""
    objective: dict[str, Any] = {"method": arm["method"], "beta": settings["beta"]}
    if "filter_sigma" in arm:
        objective["filter_sigma"] = arm["filter_sigma"]
    return {
        "model": {"name_or_path": str(base), "precision": "fp32"},
        "data": {"train": str(world.train_shuffled if arm.get("shuffled") else world.train), "max_length": 256},
        "lora": {"r": settings["lora_r"], "alpha": 2 * settings["lora_r"], "dropout": 0.0, "train_projector": True},
        "objective": objective,
        "hardness": {"rescale": "minmax"},
        "optim": {
            "learning_rate": settings["learning_rate"],
            "batch_size": settings["batch_size"],
            "max_steps": settings["steps"],
            "warmup_ratio": 0.1,
            "seed": seed,
        },
        "evaluation": {"enabled": False},
        "run": {"output_dir": str(output_dir), "resume": False, "log_every": 1},
    }


def run_arm(
    base: Path, world: LevelWorld, arm: dict[str, Any], seed: int, output_dir: Path, settings: dict[str, Any]
) -> dict[str, Any]:
    """Train one arm, score every pair with the base and the tuned model, and return its figures per level and
    its per-step filter statistics."""
    from dama_engine.config import parse_config
    from dama_engine.evaluation import parse_evaluation_config, run_evaluation
    from dama_engine.training import train

    output_dir = Path(output_dir)
    result = train(parse_config(arm_config(base, world, arm, seed, output_dir, settings)))
    evaluation = parse_evaluation_config(
        {
            "model": {"name_or_path": str(base), "precision": "fp32"},
            "adapter": str(result.adapter_dir),
            "data": {"preference": str(world.score), "max_length": 256},
            "beta": settings["beta"],
            "batch_size": 32,
            "output_dir": str(output_dir / "scores"),
        }
    )
    scored = run_evaluation(evaluation)
    assert scored.pairs_path is not None
    records = [json.loads(line) for line in Path(scored.pairs_path).read_text().splitlines() if line]
    steps = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [record for record in steps if "loss" in record]
    return {
        "levels": level_figures(records, world.levels),
        "kept_share": statistics.fmean(record["kept"] / settings["batch_size"] for record in steps),
        # Per step: the filter's mean Gaussian weight over the batch and the share of pairs weighted below 1/2.
        "filter_weight_mean": [record["filter_weight_mean"] for record in steps],
        "filter_weight_low": [record["filter_weight_low"] for record in steps],
        "beta_mean": statistics.fmean(record["beta_mean"] for record in steps),
    }


def level_figures(records: list[dict[str, Any]], levels: dict[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Per level, from an evaluation's per-pair records (``preference_pairs.jsonl``: the base's and the tuned
    model's summed log-probs, ``reward_margin`` = beta times the implicit reward gap R_i):

    - ``train_gap``: mean ``reward_margin`` over the training pairs;
    - ``train_chosen_shift``: mean change of the chosen answer's log-prob on the training pairs (tuned - base);
    - ``eval_reward_correct`` / ``eval_logp_correct`` / ``eval_n``: held-out pairs with a positive implicit reward
      gap / with the chosen answer likelier under the tuned model, and how many pairs.
    """
    figures: dict[str, dict[str, Any]] = {}
    for level in LEVELS:
        train = [r for r in records if levels[r["id"]] == ("train", level)]
        held_out = [r for r in records if levels[r["id"]] == ("eval", level)]
        figures[level] = {
            "train_gap": statistics.fmean(r["reward_margin"] for r in train),
            "train_chosen_shift": statistics.fmean(r["tuned_logp_chosen"] - r["base_logp_chosen"] for r in train),
            "eval_reward_correct": sum(r["reward_margin"] > 0 for r in held_out),
            "eval_logp_correct": sum(r["tuned_logp_chosen"] > r["tuned_logp_rejected"] for r in held_out),
            "eval_n": len(held_out),
        }
    return figures
