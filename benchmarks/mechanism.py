"""The mechanism experiment: does DAMA's data-aware factor rebalance easy and hard pairs, as the paper claims?

    python benchmarks/mechanism.py --quick     # 1 seed, 200 + 100 pairs per level: the same tables, a few minutes
    python benchmarks/mechanism.py             # 5 seeds, 600 training + 200 held-out pairs per level

The world, the arms and the figures are :mod:`dama_engine.proving.mechanism`'s: three-object scenes, an easy level
(three far-colour errors) and a hard level (one near-colour error), the planted orange/red confusion left out,
oracle hardness rescaled onto [-1, 1] (``hardness.rescale: minmax``); arms ``dpo``, ``dama_data`` with the true and
with shuffled hardness, ``dama_model`` and ``dama`` at the released filter width (1) and at a wide one (5). Every seed
resamples the pairs (world seed ``1000 + seed``) and seeds the training (order, adapter initialisation).

Settings (``--beta``, ``--lr``, ``--steps``; defaults :data:`dama_engine.proving.mechanism.SETTINGS`): beta 0.1, the
paper's, so the loss is not saturated (at the proving ground's 2.0 every level's gap sits at the loss's flat end);
learning rate 1e-4 and 150 steps at batch 16 (two epochs of the 1,200 training pairs), LoRA r 16 with the projector.
The premise is checked first and printed: under DPO the easy level's mean training gap must be at least 1.5 times
the hard level's and held-out implicit-reward accuracy easy - hard at least 0.10; otherwise the world cannot test the
claim as set. The claim is then tested against DPO, paired by seed, with a two-sided paired t-test (n - 1 degrees of
freedom) and a two-sided sign test, declared before the runs: the easy/hard training-gap ratio, held-out hard and easy
implicit-reward accuracy. Held-out accuracies carry 95% Wilson intervals (pooled over seeds).

Writes ``--out`` (default ``docs/measurements/mechanism.md``) with the tables, the command line, the settings and
the machine, and the per-run rows beside it (``.json``). Runs ``--jobs`` arms at a time (default 2), one torch thread
each; the seeing base is the proving ground's (built once under ``DAMA_PROVING_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dama_engine.proving.mechanism import ARMS, LEVELS, SETTINGS  # noqa: E402
from dama_engine.proving.stats import paired_table, wilson_interval  # noqa: E402

PREMISE_GAP_RATIO = 1.5
PREMISE_ACCURACY_GAP = 0.10


def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    """One arm on one seed, in a worker process (one torch thread)."""
    from transformers.utils import logging

    from dama_engine.proving.mechanism import run_arm, world_at
    from dama_engine.threads import apply_threads

    logging.disable_progress_bar()  # no weight-loading bars from every run
    apply_threads(1)
    started = time.monotonic()
    figures = run_arm(
        Path(task["base"]),
        world_at(Path(task["world"])),
        ARMS[task["arm"]],
        task["seed"],
        Path(task["output_dir"]),
        task["settings"],
    )
    return {"arm": task["arm"], "seed": task["seed"], "seconds": round(time.monotonic() - started, 1), **figures}


def _ratio(row: Mapping[str, Any]) -> float:
    easy, hard = row["levels"]["easy"]["train_gap"], row["levels"]["hard"]["train_gap"]
    return easy / hard if hard > 0 else float("inf")


def _accuracy(row: Mapping[str, Any], level: str, key: str = "eval_reward_correct") -> float:
    figures = row["levels"][level]
    return figures[key] / figures["eval_n"]


def _pooled(rows: list[dict[str, Any]], level: str, key: str) -> str:
    correct = sum(row["levels"][level][key] for row in rows)
    n = sum(row["levels"][level]["eval_n"] for row in rows)
    low, high = wilson_interval(correct, n, 0.95)
    return f"{correct / n:.3f} [{low:.3f}, {high:.3f}]"


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(rows: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    """The premise, the per-level table, the paired statistics against DPO and the filter's selectivity."""
    by_arm = {arm: sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"]) for arm in ARMS}
    by_arm = {arm: arm_rows for arm, arm_rows in by_arm.items() if arm_rows}
    lines: list[str] = []
    dpo = by_arm.get("dpo", [])
    if dpo:
        ratio = statistics.fmean(_ratio(r) for r in dpo)
        accuracy_gap = statistics.fmean(_accuracy(r, "easy") - _accuracy(r, "hard") for r in dpo)
        holds = ratio >= PREMISE_GAP_RATIO and accuracy_gap >= PREMISE_ACCURACY_GAP
        lines += [
            "## Premise (DPO)",
            "",
            f"- easy/hard mean training gap: {ratio:.2f} (needs >= {PREMISE_GAP_RATIO})",
            f"- held-out implicit-reward accuracy easy - hard: {accuracy_gap:+.3f} (needs >= {PREMISE_ACCURACY_GAP})",
            f"- premise {'holds' if holds else 'FAILS: this world cannot test the claim as set'}",
            "",
        ]
    lines += [
        "## Per level (mean ± sd over seeds; held-out accuracies pooled over seeds with 95% Wilson intervals)",
        "",
        "| arm | level | training gap | chosen log-prob shift | held-out reward acc | held-out log-prob acc |",
        "|---|---|---|---|---|---|",
    ]
    for arm, arm_rows in by_arm.items():
        for level in LEVELS:
            gaps = [r["levels"][level]["train_gap"] for r in arm_rows]
            shifts = [r["levels"][level]["train_chosen_shift"] for r in arm_rows]
            lines.append(
                f"| {arm} | {level} | {_mean_sd(gaps)} | {_mean_sd(shifts, 2)} | "
                f"{_pooled(arm_rows, level, 'eval_reward_correct')} | {_pooled(arm_rows, level, 'eval_logp_correct')} |"
            )
    lines += ["", "| arm | easy/hard gap ratio | beta mean | kept share | filter weight mean | weights < 1/2 |"]
    lines += ["|---|---|---|---|---|---|"]
    for arm, arm_rows in by_arm.items():
        weights = [w for r in arm_rows for w in r["filter_weight_mean"]]
        low = [w for r in arm_rows for w in r["filter_weight_low"]]
        quartiles = statistics.quantiles(weights, n=4) if len(weights) > 1 else [weights[0]] * 3
        lines.append(
            f"| {arm} | {_mean_sd([_ratio(r) for r in arm_rows], 2)} | {_mean_sd([r['beta_mean'] for r in arm_rows])} "
            f"| {_mean_sd([r['kept_share'] for r in arm_rows], 2)} | {statistics.fmean(weights):.3f} "
            f"(quartiles {quartiles[0]:.3f}, {quartiles[1]:.3f}, {quartiles[2]:.3f}) | {statistics.fmean(low):.3f} |"
        )
    if len(seeds) > 1 and dpo:
        lines += [
            "",
            "## Against DPO, paired by seed (arm - dpo; two-sided paired t-test and sign test)",
            "",
        ]
        lines += paired_table(
            rows,
            arm_key="arm",
            reference="dpo",
            measures={
                "easy/hard gap ratio": _ratio,
                "held-out hard reward acc": lambda row: _accuracy(row, "hard"),
                "held-out easy reward acc": lambda row: _accuracy(row, "easy"),
            },
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 200 training + 100 held-out pairs per level")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-per-level", type=int, default=600)
    parser.add_argument("--eval-per-level", type=int, default=200)
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--beta", type=float, default=SETTINGS["beta"])
    parser.add_argument("--lr", type=float, default=SETTINGS["learning_rate"])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="arms run at a time, one torch thread each")
    parser.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dama-mechanism")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements" / "mechanism.md")
    parser.add_argument(
        "--figure-from", type=Path, help="draw the figure from a run's rows (its .json) and exit, without training"
    )
    args = parser.parse_args(argv)
    if args.figure_from:
        print(f"[mechanism] wrote {figure(json.loads(args.figure_from.read_text()), args.figure_from)}")
        return 0
    if args.quick:
        args.seeds, args.train_per_level, args.eval_per_level = 1, 200, 100
        if args.out == parser.get_default("out"):
            args.out = ROOT / "docs" / "measurements" / "mechanism_quick.md"
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    settings = {**SETTINGS, "steps": args.steps, "beta": args.beta, "learning_rate": args.lr}

    from dama_engine.proving import BASE, build_seeing_base
    from dama_engine.proving.ground import ground_at
    from dama_engine.proving.mechanism import make_level_pairs
    from dama_engine.threads import apply_threads

    apply_threads(1)
    started = time.monotonic()
    ground = ground_at()
    print(f"[mechanism] seeing base under {ground.base} (built once, about a minute)", flush=True)
    build_seeing_base(ground.base, **BASE)
    seeds = list(range(args.seeds))
    tasks = []
    for seed in seeds:
        world = make_level_pairs(
            args.work_dir / f"world-{seed}",
            seed=1000 + seed,
            train_per_level=args.train_per_level,
            eval_per_level=args.eval_per_level,
        )
        for arm in arms:
            run_dir = args.work_dir / "runs" / f"{arm.replace(' ', '_')}-seed{seed}"
            tasks.append(
                {"arm": arm, "seed": seed, "base": str(ground.base), "world": str(world.root), "settings": settings}
                | {"output_dir": str(run_dir)}
            )
    print(f"[mechanism] {len(tasks)} runs ({len(arms)} arms x {len(seeds)} seeds), {args.jobs} at a time", flush=True)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for row in pool.map(_run_task, tasks):
            rows.append(row)
            easy, hard = row["levels"]["easy"], row["levels"]["hard"]
            print(
                f"[mechanism] {row['arm']} seed {row['seed']}: gap easy {easy['train_gap']:.3f} hard "
                f"{hard['train_gap']:.3f}, held-out reward acc easy {_accuracy(row, 'easy'):.3f} hard "
                f"{_accuracy(row, 'hard'):.3f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    minutes = (time.monotonic() - started) / 60
    command = "python benchmarks/mechanism.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        "# Mechanism experiment" + (" (quick)" if args.quick else ""),
        "",
        f"`{command.strip()}`: {len(seeds)} seed(s), {args.train_per_level} training + {args.eval_per_level} held-out "
        f"pairs per level, settings {json.dumps(settings)}; {minutes:.1f} min on {platform.machine()} "
        f"({os.cpu_count()} cores), {args.jobs} runs at a time, 1 torch thread each.",
        "",
    ]
    text = "\n".join([*header, *report(rows, seeds)]) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"[mechanism] wrote {args.out}, {args.out.with_suffix('.json')} and {figure(rows, args.out)}")
    return 0


def figure(rows: list[dict[str, Any]], out: Path) -> Path:
    """Two panels, one point per seed: each arm's mean training gap on the easy and the hard level, and each arm's
    easy/hard gap ratio minus DPO's of the same seed (the paired difference the claim is tested on). Written beside
    ``out`` under ``images/`` as ``<out's stem>.png``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(row["arm"] for row in rows))
    dpo = {row["seed"]: _ratio(row) for row in rows if row["arm"] == "dpo"}
    fig, (gaps, ratios) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=False)
    for position, arm in enumerate(arms):
        runs = [row for row in rows if row["arm"] == arm]
        for level, colour, shift in (("easy", "tab:blue", -0.15), ("hard", "tab:red", 0.15)):
            values = [row["levels"][level]["train_gap"] for row in runs]
            gaps.scatter([position + shift] * len(values), values, color=colour, s=14, alpha=0.7)
            gaps.hlines(statistics.fmean(values), position + shift - 0.1, position + shift + 0.1, color=colour)
        differences = [_ratio(row) - dpo[row["seed"]] for row in runs if row["seed"] in dpo]
        ratios.scatter([position] * len(differences), differences, color="black", s=14, alpha=0.7)
        if differences:
            ratios.hlines(statistics.fmean(differences), position - 0.2, position + 0.2, color="black")
    for axis in (gaps, ratios):
        axis.set_xticks(range(len(arms)), [arm.replace(" (", "\n(") for arm in arms], fontsize=7)
        axis.margins(x=0.05, y=0.08)
    gaps.scatter([], [], color="tab:blue", label="easy level")
    gaps.scatter([], [], color="tab:red", label="hard level")
    gaps.legend(fontsize=8)
    gaps.set_ylabel("mean reward gap on the training pairs")
    gaps.set_title("Training gap per level (dots: seeds; bars: means)", fontsize=9)
    ratios.axhline(0.0, color="grey", linewidth=0.8)
    ratios.set_ylabel("easy/hard gap ratio minus DPO's (same seed)")
    ratios.set_title("Above 0: the arm widens the imbalance DPO has", fontsize=9)
    fig.tight_layout()
    path = out.parent / "images" / f"{out.stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
