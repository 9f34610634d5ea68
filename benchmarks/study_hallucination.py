"""The proving-ground study: from one seeing base and one set of shapes-world pairs, train each preference method
and a same-compute SFT control, and measure hallucination (CHAIR) and held-out preference accuracy per bucket.

    PYTHONPATH=. python benchmarks/study_hallucination.py --quick      # 1 seed, short runs (a smoke figure)
    PYTHONPATH=. python benchmarks/study_hallucination.py              # 5 seeds, the full study

The base is :func:`dama_engine.seeing_base.build_seeing_base` (seed 0, cached under ``--work-dir``). The held-out
pairs come from the same source as the training pairs; the held-out scenes for CHAIR
are drawn with another seed. Every method trains a LoRA (r 16, projector trained) for the same number of steps at
the same learning rate; the control (``sft``) trains on the chosen answers for as many steps. Writes a table and a
chart into ``docs/RESULTS.md`` / ``docs/images/results.png`` (``--results`` to change) with this command line.
``--pairs on_policy`` (default, the headline): the base's own sampled descriptions of training scenes labelled
against the ground truth (:mod:`dama_engine.on_policy`); ``--pairs synthetic``: the swap pairs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dama_engine.threads import apply_threads  # noqa: E402

METHODS = ("sft", "dpo", "beta_dpo", "dama_data", "dama_model", "dama")


def _run(
    base: Path, pairs: Path, data: Path, out: Path, method: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    from dama_engine.config import parse_config
    from dama_engine.trainer import train

    config = parse_config(
        {
            "model": {"name_or_path": str(base), "precision": "fp32"},
            "data": {"train": str(pairs / "train.jsonl"), "eval": str(pairs / "eval.jsonl"), "max_length": 256},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "train_projector": True},
            "objective": {"method": method},
            "optim": {
                "learning_rate": args.learning_rate,
                "batch_size": 16,
                "max_steps": args.steps,
                "warmup_ratio": 0.1,
                "seed": seed,
            },
            "evaluation": {
                "generative": str(data / "generative_eval.jsonl"),
                "vocabulary": str(data / "vocabulary.json"),
                "max_samples": args.scenes,
                "max_new_tokens": 40,
            },
            "run": {"output_dir": str(out), "resume": False, "log_every": 50},
        }
    )
    started = time.monotonic()
    result = train(config)
    evaluation = result.evaluation or {}
    generative, preference = evaluation.get("generative", {}), evaluation.get("preference", {})
    implicit = preference.get("implicit_reward", {})
    buckets = implicit.get("buckets", {})
    row: dict[str, Any] = {"method": method, "seed": seed, "seconds": round(time.monotonic() - started, 1)}
    for side in ("base", "tuned"):
        for key in ("chair_i", "chair_s", "coverage"):
            row[f"{side}_{key}"] = generative.get(side, {}).get(key)
    row["accuracy"] = implicit.get("overall", {}).get("accuracy")
    row["margin"] = implicit.get("overall", {}).get("margin")
    for name in ("easy", "medium", "hard"):
        row[f"accuracy_{name}"] = (buckets.get(name) or {}).get("accuracy")
        row[f"margin_{name}"] = (buckets.get(name) or {}).get("margin")
    if row["accuracy_easy"] is not None and row["accuracy_hard"] is not None:
        row["gap"] = row["accuracy_easy"] - row["accuracy_hard"]
    return row


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _write_results(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = Path(args.results)
    chart = results.parent / "images" / "results.png"
    chart.parent.mkdir(parents=True, exist_ok=True)
    base = rows[0]
    lines = [
        "# Proving ground: hallucination before and after, per method",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min; seeds {args.seeds}; {args.steps} steps of batch 16 at "
        f"lr {args.learning_rate}; {args.scenes} held-out scenes, greedy; torch threads {args.threads}; "
        f"{platform.machine()} {platform.system()}, {__import__('os').cpu_count()} cores, shared).",
        "",
        f"Base (seeing base, seed 0): CHAIR_i {base['base_chair_i']:.3f}, CHAIR_s {base['base_chair_s']:.3f}, "
        f"coverage {base['base_coverage']:.3f}.",
        "",
        f"Pairs: {args.pairs} (shapes world v2; oracle hardness). Preference accuracy and margin are the implicit "
        "reward's on the held-out pairs, by hardness tertile; gap = easy - hard accuracy. `sft` is the same-compute "
        "control on the chosen answers. Mean ± sd over seeds.",
        "",
        "| method | CHAIR_i | CHAIR_s | coverage | accuracy | easy | hard | gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, float] = {}
    for method in METHODS:
        mine = [row for row in rows if row["method"] == method]
        if not mine:
            continue

        def pick(key: str, rows_: list[dict[str, Any]] = mine) -> list[Any]:
            return [row.get(key) for row in rows_]

        summary[method] = statistics.mean(pick("tuned_chair_i"))
        lines.append(
            f"| {method} | {_mean_sd(pick('tuned_chair_i'))} | {_mean_sd(pick('tuned_chair_s'))} | "
            f"{_mean_sd(pick('tuned_coverage'))} | {_mean_sd(pick('accuracy'))} | {_mean_sd(pick('accuracy_easy'))} "
            f"| {_mean_sd(pick('accuracy_hard'))} | {_mean_sd(pick('gap'))} |"
        )
    lines += ["", "![CHAIR_i per method](images/results.png)", ""]
    results.write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(7, 3.5))
    names = list(summary)
    axis.bar(names, [summary[name] for name in names], color="#4c72b0")
    axis.axhline(base["base_chair_i"], color="#c44e52", linestyle="--", label="base")
    axis.set_ylabel("CHAIR_i (lower is better)")
    axis.legend(loc="best")
    figure.tight_layout()
    figure.savefig(chart, dpi=100)
    (results.parent / "measurements").mkdir(exist_ok=True)
    (results.parent / "measurements" / "study_rows.json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 steps, 200 scenes (about 5 minutes)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds (default 5; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 150; 40 with --quick)")
    parser.add_argument("--scenes", type=int, default=None, help="held-out scenes (default 300; 200 with --quick)")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument(
        "--pairs",
        choices=("on_policy", "synthetic"),
        default="on_policy",
        help="on_policy: the base's own sampled descriptions labelled against the truth; synthetic: swaps",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default DAMA_TORCH_THREADS or 1)")
    parser.add_argument("--work-dir", default="runs/study")
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.steps = args.steps or (40 if args.quick else 150)
    args.scenes = args.scenes or (200 if args.quick else 300)
    args.policy_scenes = 800 if args.quick else 2400
    args.threads = apply_threads(args.threads)
    command = "python benchmarks/study_hallucination.py " + " ".join(argv if argv is not None else sys.argv[1:])

    from dama_engine.data.demo import make_demo_dataset
    from dama_engine.seeing_base import build_seeing_base

    started = time.monotonic()
    work = Path(args.work_dir)
    base = build_seeing_base(work / "base", seed=0)
    data = work / f"pairs-{args.scenes}"
    if not (data / "train.jsonl").is_file():
        make_demo_dataset(
            data, n_train=1600, n_eval=300, n_generative=args.scenes, image_size=32, seed=7, with_hardness=True
        )
    pairs = data
    if args.pairs == "on_policy":
        from dama_engine.on_policy import on_policy_pairs

        pairs = work / f"on-policy-{args.policy_scenes}"
        if not (pairs / "train.jsonl").is_file():
            print(json.dumps(on_policy_pairs(base, pairs, scenes=args.policy_scenes, seed=11)), flush=True)
    rows = []
    for seed in range(args.seeds):
        for method in args.methods.split(","):
            row = _run(base, pairs, data, work / f"{args.pairs}-{method}-{seed}", method, seed, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    _write_results(rows, args, command.strip(), time.monotonic() - started)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
