"""The proving-ground study: from one seeing base and one set of on-policy pairs, train each preference method and a
same-compute SFT control over several seeds, and measure hallucination (CHAIR) on held-out scenes and held-out
preference accuracy per hardness bucket.

    python benchmarks/study_hallucination.py --quick      # 1 seed, 100 steps, 200 scenes (about 5 minutes)
    python benchmarks/study_hallucination.py --select     # the full study: settings chosen on validation scenes
                                                          # (8 seed-0 runs), then 5 seeds, 300 steps, 300 scenes

Base, pairs, held-out scenes and settings are the proving ground's (:mod:`dama_engine.proving`, the same the demo
and the learning regression test use; cached under ``--work-dir``). Every run trains a LoRA (projector trained too)
from the same base for the same number of steps at batch 16 with the same learning rate and beta; seeds change the
data order and the adapter's initialisation. The control (``sft``) trains on the chosen answers. Two more rows:
``dama (filter_sigma 1.0)`` is DAMA with the released code's filter width, ``dama (keep_ratio 1.0)`` DAMA without the
filter. ``--select`` chooses beta, the learning rate and DAMA's filter on validation scenes of their own seed
(:data:`VALIDATION`) first, by the rule :func:`select_settings` states; without it the proving ground's settings are
used. Each run's CHAIR_i is also split into the base's planted colour error and other slips (from the evaluation's
``generations.jsonl``), and the hardness tertiles' accuracies get Wilson intervals.
``--pairs synthetic`` trains on the shapes world's swap pairs instead (same length and structure, graded difficulty,
oracle hardness; :func:`dama_engine.proving.shapes.make_demo_dataset`), with the same base, scenes and settings.
Writes a table and a chart into ``docs/RESULTS.md`` / ``docs/images/results.png`` (``--results`` to change;
``docs/measurements/results_synthetic.md`` for ``--pairs synthetic``), with this command line, the seeds, the
threads and the machine, keeping a hand-written ``## Reading`` section; the per-run rows go to ``docs/measurements``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dama_engine.threads import apply_threads  # noqa: E402

METHODS = ("sft", "dpo", "beta_dpo", "dama_data", "dama_model", "dama")
# DAMA once more with the released code's filter width, and once without the filter (every pair kept).
EXTRA: dict[str, list[dict[str, Any]]] = {"dama": [{"filter_sigma": 1.0}, {"keep_ratio": 1.0}]}
# Validation scenes for choosing the settings: their own seed, never the held-out test scenes' (SCENES["seed"] 7).
VALIDATION = {"count": 200, "seed": 17}
# The settings tried on the validation scenes (seed 0): the shared (beta, learning rate) chosen by DPO's CHAIR_i,
# then DAMA's filter by DAMA's CHAIR_i at those (keep_ratio 1: no filter).
SHARED_GRID = (
    {"beta": 2.0, "lr": 3e-4},
    {"beta": 1.0, "lr": 3e-4},
    {"beta": 0.5, "lr": 3e-4},
    {"beta": 2.0, "lr": 1e-4},
)
FILTER_GRID = ({"filter_sigma": 1.0}, {"filter_sigma": 3.0}, {"filter_sigma": 5.0}, {"keep_ratio": 1.0})


def _run(
    ground: Any,
    out: Path,
    method: str,
    seed: int,
    args: argparse.Namespace,
    *,
    scenes: Path | None = None,
    settings: dict[str, float] | None = None,
    **objective: Any,
) -> dict[str, Any]:
    """One training run and its evaluation; ``scenes``: the generative set to measure CHAIR on (default the
    held-out test scenes); ``settings``: beta, lr and the filter (default the study's chosen ones)."""
    from dama_engine.config import apply_overrides, parse_config
    from dama_engine.proving.ground import training_values
    from dama_engine.training.recipe import train

    chosen = settings or args.settings
    values = training_values(ground, out, scenes=args.scenes, seed=seed)
    overrides = [
        f"objective.method={method}",
        f"optim.max_steps={args.steps}",
        f"objective.beta={chosen['beta']}",
        f"optim.learning_rate={chosen['lr']}",
        f"objective.filter_sigma={chosen['filter_sigma']}",
        f"objective.keep_ratio={chosen['keep_ratio']}",
    ]
    if scenes is not None:
        overrides += [f"evaluation.generative={scenes}", f"evaluation.max_samples={VALIDATION['count']}"]
    if args.pairs_dir is not None:
        overrides += [f"data.train={args.pairs_dir / 'train.jsonl'}", f"data.eval={args.pairs_dir / 'eval.jsonl'}"]
    overrides += [f"objective.{key}={value}" for key, value in objective.items()]
    config = parse_config(apply_overrides(values, overrides))
    started = time.monotonic()
    result = train(config)
    evaluation = result.evaluation or {}
    generative, preference = evaluation.get("generative", {}), evaluation.get("preference", {})
    implicit = preference.get("implicit_reward", {})
    buckets = implicit.get("buckets", {})
    label = method + "".join(f" ({key} {value})" for key, value in objective.items())
    row: dict[str, Any] = {"method": label, "seed": seed, "seconds": round(time.monotonic() - started, 1)}
    for side in ("base", "tuned"):
        for key in ("chair_i", "chair_s", "coverage"):
            row[f"{side}_{key}"] = generative.get(side, {}).get(key)
    row["accuracy"] = implicit.get("overall", {}).get("accuracy")
    row["margin"] = implicit.get("overall", {}).get("margin")
    row["logp_accuracy"] = (preference.get("tuned") or {}).get("overall", {}).get("logp_accuracy")
    for name in ("easy", "medium", "hard"):
        row[f"accuracy_{name}"] = (buckets.get(name) or {}).get("accuracy")
        row[f"margin_{name}"] = (buckets.get(name) or {}).get("margin")
        row[f"count_{name}"] = (buckets.get(name) or {}).get("count")
    if row["accuracy_easy"] is not None and row["accuracy_hard"] is not None:
        row["gap"] = row["accuracy_easy"] - row["accuracy_hard"]
    generations = sorted(out.rglob("generations.jsonl"))
    if generations:
        records = [json.loads(line) for line in generations[0].read_text().splitlines()]
        row.update(chair_by_error_type(records, "tuned"))
        row.update({f"base_{key}": value for key, value in chair_by_error_type(records, "base").items()})
    return row


def planted(name: str, truth: list[str]) -> bool:
    """Whether a hallucinated mention is the base's planted colour error: a red object where the scene has an orange
    one of the same shape (the base's training descriptions called orange red in 70% of mentions)."""
    return name.startswith("red ") and f"orange {name[4:]}" in truth


def chair_by_error_type(records: list[dict[str, Any]], which: str) -> dict[str, float | None]:
    """CHAIR_i of ``which`` model ("base" or "tuned") split by error type (each over all mentions, so the two add
    up to CHAIR_i): the planted colour error (:func:`planted`) and every other hallucinated mention; from the
    evaluation's ``generations.jsonl``."""
    mentions = planted_count = other = 0
    for record in records:
        tuned = record.get(which) or {}
        mentions += len(tuned.get("mentioned", []))
        for name in tuned.get("hallucinated", []):
            if planted(name, record["objects"]):
                planted_count += 1
            else:
                other += 1
    if not mentions:
        return {"chair_i_planted": None, "chair_i_other": None}
    return {"chair_i_planted": planted_count / mentions, "chair_i_other": other / mentions}


def validation_scenes(ground: Any) -> Path:
    """The validation scenes (:data:`VALIDATION`: their own seed), built once beside the proving ground; the
    generative set's JSONL file (its vocabulary is the proving ground's)."""
    from dama_engine.proving.ground import IMAGE_SIZE
    from dama_engine.proving.shapes import make_demo_dataset

    folder = ground.root / "validation"
    data = folder / "generative_eval.jsonl"
    stamp = folder / "validation.json"
    if not data.is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != VALIDATION:
        shutil.rmtree(folder, ignore_errors=True)
        make_demo_dataset(
            folder,
            n_train=0,
            n_eval=0,
            n_generative=VALIDATION["count"],
            image_size=IMAGE_SIZE,
            seed=VALIDATION["seed"],
        )
        stamp.write_text(json.dumps(VALIDATION))
    return data


def select_settings(ground: Any, args: argparse.Namespace, runs: Path) -> tuple[dict[str, float], list[str]]:
    """Choose the study's settings on the validation scenes with seed-0 runs (never the test scenes): the shared
    beta and learning rate that give DPO the lowest CHAIR_i (so the baseline is tuned, not the method under test),
    then DAMA's filter (a width, or none) that gives DAMA the lowest CHAIR_i at those. Returns the settings and
    the Markdown lines that record every candidate's figure."""
    from dama_engine.proving.ground import TRAINING

    scenes = validation_scenes(ground)
    default_keep = 0.8  # the engine's keep_ratio default (dama_settings.knobs)
    lines = [
        f"Settings chosen on {VALIDATION['count']} validation scenes (seed {VALIDATION['seed']}; the test scenes' "
        f"seed is another), seed-0 runs of {args.steps} steps; CHAIR_i of each candidate:",
        "",
        "| stage | candidate | CHAIR_i (validation) | coverage |",
        "|---|---|---|---|",
    ]
    shared: list[tuple[float, dict[str, float]]] = []
    for candidate in SHARED_GRID:
        settings = {**candidate, "filter_sigma": TRAINING["filter_sigma"], "keep_ratio": default_keep}
        row = _run(ground, runs / "select", "dpo", 0, args, scenes=scenes, settings=settings)
        shutil.rmtree(runs / "select", ignore_errors=True)
        print(json.dumps({"select": "shared", **settings, **row}), flush=True)
        shared.append((row["tuned_chair_i"], settings))
        lines.append(
            f"| shared, by dpo | beta {candidate['beta']}, lr {candidate['lr']:g} | {row['tuned_chair_i']:.3f} | "
            f"{row['tuned_coverage']:.3f} |"
        )
    best_shared = min(shared, key=lambda item: item[0])[1]
    filters: list[tuple[float, dict[str, float]]] = []
    for candidate in FILTER_GRID:
        settings = {**best_shared, **candidate}
        if "keep_ratio" not in candidate:
            settings["keep_ratio"] = default_keep
        row = _run(ground, runs / "select", "dama", 0, args, scenes=scenes, settings=settings)
        shutil.rmtree(runs / "select", ignore_errors=True)
        print(json.dumps({"select": "filter", **settings, **row}), flush=True)
        filters.append((row["tuned_chair_i"], settings))
        name = (
            "no filter (keep_ratio 1)"
            if candidate.get("keep_ratio") == 1.0
            else f"filter_sigma {candidate['filter_sigma']}"
        )
        lines.append(f"| filter, by dama | {name} | {row['tuned_chair_i']:.3f} | {row['tuned_coverage']:.3f} |")
    chosen = min(filters, key=lambda item: item[0])[1]
    lines += [
        "",
        f"Chosen: beta {chosen['beta']}, lr {chosen['lr']:g}, "
        + ("no filter (keep_ratio 1)" if chosen["keep_ratio"] == 1.0 else f"filter_sigma {chosen['filter_sigma']}")
        + " (ties go to the first listed).",
    ]
    return chosen, lines


def _interval(rows: list[dict[str, Any]], bucket: str) -> str:
    """The mean held-out accuracy of a hardness bucket with its 95% Wilson interval over the bucket's pairs (the
    same pairs in every seed, so the interval is that of one seed's count at the mean accuracy)."""
    from dama_engine.proving.stats import wilson_interval

    accuracies = [row[f"accuracy_{bucket}"] for row in rows if row.get(f"accuracy_{bucket}") is not None]
    counts = [row.get(f"count_{bucket}") for row in rows if row.get(f"count_{bucket}")]
    if not accuracies or not counts:
        return "-"
    mean, n = statistics.mean(accuracies), int(counts[0])
    low, high = wilson_interval(round(mean * n), n, 0.95)
    return f"{mean:.3f} [{low:.2f}, {high:.2f}] (n {n})"


def _mean_sd(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.3f}"
    return f"{statistics.mean(present):.3f} ± {statistics.stdev(present):.3f}"


def _write_results(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dama_engine.proving.ground import TRAINING

    results = Path(args.results)
    chart = results.parent / "images" / f"{results.stem.lower()}.png"
    chart.parent.mkdir(parents=True, exist_ok=True)
    base = rows[0]
    labels = list(dict.fromkeys(row["method"] for row in rows))
    lines = [
        "# Proving ground: hallucination before and after, per method",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min; seeds {', '.join(str(s) for s in range(args.seeds))}; "
        f"{args.steps} steps of batch {TRAINING['batch_size']} at lr {args.settings['lr']:g}, beta "
        f"{args.settings['beta']}, "
        + (
            "no filter (keep_ratio 1)"
            if args.settings["keep_ratio"] == 1.0
            else f"filter_sigma {args.settings['filter_sigma']}, keep_ratio {args.settings['keep_ratio']}"
        )
        + f"; {args.scenes} held-out scenes, greedy; torch threads {args.threads}; {platform.machine()} "
        f"{platform.system()}, {os.cpu_count()} cores, shared).",
        "",
        *args.selection,
        "",
        f"Base (the seeing base, `dama_engine.proving`): CHAIR_i {base['base_chair_i']:.3f}, CHAIR_s "
        f"{base['base_chair_s']:.3f}, coverage {base['base_coverage']:.3f}.",
        "",
        (
            "Pairs: on-policy (the base's own sampled descriptions of training scenes, a faithful one preferred to a "
            "hallucinating one; oracle hardness). "
            if args.pairs_dir is None
            else "Pairs: synthetic swaps (the shapes world's canonical description against the same sentence with "
            "colours or shapes swapped; same length and structure; oracle hardness). "
        )
        + "CHAIR_i, CHAIR_s and coverage on the held-out scenes; `logp acc`: "
        "share of held-out pairs whose chosen answer the tuned model finds likelier; `accuracy`, `easy`, `hard`: "
        "the implicit reward's held-out accuracy, overall and in the easiest and hardest third by oracle "
        "hardness (tertile cuts; pairs tied at a cut go to the middle bucket); gap = easy - hard. `sft` is the "
        "same-compute control on the chosen answers. Mean ± sd over seeds.",
        "",
        "| method | CHAIR_i | CHAIR_s | coverage | logp acc | accuracy | easy | hard | gap | margin easy "
        "| margin hard |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    means: dict[str, float] = {}
    spreads: dict[str, float] = {}
    for label in labels:
        mine = [row for row in rows if row["method"] == label]

        def pick(key: str, rows_: list[dict[str, Any]] = mine) -> list[Any]:
            return [row.get(key) for row in rows_]

        chair_i = pick("tuned_chair_i")
        means[label] = statistics.mean(chair_i)
        spreads[label] = statistics.stdev(chair_i) if len(chair_i) > 1 else 0.0
        cells = [
            _mean_sd(pick(key))
            for key in (
                "tuned_chair_i",
                "tuned_chair_s",
                "tuned_coverage",
                "logp_accuracy",
                "accuracy",
                "accuracy_easy",
                "accuracy_hard",
                "gap",
                "margin_easy",
                "margin_hard",
            )
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "CHAIR_i by error type (each over all mentions, so the two add to CHAIR_i): the planted colour error (a red "
        "object where the scene has an orange one of that shape, the base's trained-in bias) and every other "
        "hallucinated mention; and the held-out implicit-reward accuracy of the easiest and hardest third with 95% "
        "Wilson intervals over the bucket's pairs (the same pairs in every seed). Mean over seeds.",
        "",
        "| method | CHAIR_i planted colour | CHAIR_i other | easy accuracy [95%] | hard accuracy [95%] |",
        "|---|---|---|---|---|",
        f"| base | {_mean_sd([base.get('base_chair_i_planted')])} | {_mean_sd([base.get('base_chair_i_other')])} | - "
        "| - |",
    ]
    for label in labels:
        mine = [row for row in rows if row["method"] == label]
        lines.append(
            f"| {label} | {_mean_sd([row.get('chair_i_planted') for row in mine])} | "
            f"{_mean_sd([row.get('chair_i_other') for row in mine])} | {_interval(mine, 'easy')} | "
            f"{_interval(mine, 'hard')} |"
        )
    lines += ["", f"![CHAIR_i per method](images/{chart.name})", ""]
    if "dpo" in labels and args.seeds > 1:
        lines += [*paired_lines(rows), ""]
    kept = ""
    if results.is_file():  # the hand-written reading of an earlier run stays (its author updates it)
        earlier = results.read_text()
        if "\n## Reading" in earlier:
            kept = earlier[earlier.index("\n## Reading") + 1 :]
    results.write_text("\n".join(lines) + "\n" + kept)
    figure, axis = plt.subplots(figsize=(8, 3.8))
    axis.bar(labels, [means[label] for label in labels], yerr=[spreads[label] for label in labels], color="#4c72b0")
    axis.axhline(base["base_chair_i"], color="#c44e52", linestyle="--", label="base")
    axis.set_ylabel("CHAIR_i (lower is better)")
    axis.set_title(f"CHAIR_i on {args.scenes} held-out scenes, mean ± sd over {args.seeds} seed(s)")
    axis.tick_params(axis="x", labelrotation=20)
    axis.legend(loc="best")
    figure.tight_layout()
    figure.savefig(chart, dpi=100)
    # Per-run rows beside the measurements (docs/measurements/ for docs/RESULTS.md).
    measurements = results.parent if results.parent.name == "measurements" else results.parent / "measurements"
    measurements.mkdir(exist_ok=True)
    (measurements / f"{results.stem.lower()}_rows.json").write_text(json.dumps(rows, indent=1) + "\n")


def paired_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each method against DPO, paired by seed: the held-out CHAIR_i, the hard tertile's implicit-reward accuracy
    and the easy - hard accuracy gap (two-sided paired t-test and sign test of the per-seed differences)."""
    from dama_engine.proving.stats import paired_table

    return [
        "Against DPO, paired by seed (method - dpo; two-sided paired t-test with n - 1 degrees of freedom and exact "
        "sign test; with 5 seeds the sign test's smallest p is 0.062):",
        "",
        *paired_table(
            rows,
            arm_key="method",
            reference="dpo",
            measures={
                "CHAIR_i": lambda row: row["tuned_chair_i"],
                "coverage": lambda row: row["tuned_coverage"],
                "CHAIR_i planted colour": lambda row: row.get("chair_i_planted"),
                "hard accuracy": lambda row: row["accuracy_hard"],
                "easy - hard gap": lambda row: row["gap"],
            },
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 100 steps, 200 scenes (about 5 minutes)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds (default 5; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the proving ground's)")
    parser.add_argument("--scenes", type=int, default=None, help="held-out scenes (default 300; 200 with --quick)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pairs", choices=("on_policy", "synthetic"), default="on_policy", help="which pairs")
    parser.add_argument(
        "--select",
        action="store_true",
        help="choose beta, lr and DAMA's filter on validation scenes first (seed-0 runs; never the test scenes)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default DAMA_TORCH_THREADS or 1)")
    parser.add_argument("--work-dir", default=None, help="the proving ground's cache (default DAMA_PROVING_DIR)")
    parser.add_argument(
        "--results",
        default=None,
        help="where the table goes (default docs/RESULTS.md; docs/measurements/results_synthetic.md with "
        "--pairs synthetic); text from a '## Reading' heading on in an existing file is kept",
    )
    parser.add_argument(
        "--paired-from", type=Path, help="print the paired table of an earlier run's rows (its _rows.json) and exit"
    )
    args = parser.parse_args(argv)
    if args.paired_from:
        print("\n".join(paired_lines(json.loads(args.paired_from.read_text()))))
        return 0

    from dama_engine.proving.ground import SCENES, TRAINING, prepare_proving_ground, synthetic_pairs

    args.seeds = args.seeds or (1 if args.quick else 5)
    args.steps = args.steps or (100 if args.quick else TRAINING["steps"])
    args.scenes = args.scenes or (200 if args.quick else SCENES["count"])
    args.threads = apply_threads(args.threads)
    if args.results is None:
        docs = ROOT / "docs"
        args.results = str(
            docs / "RESULTS.md" if args.pairs == "on_policy" else docs / "measurements" / "results_synthetic.md"
        )
    command = "python benchmarks/study_hallucination.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"[study] torch threads: {args.threads}", flush=True)

    started = time.monotonic()
    ground = prepare_proving_ground(Path(args.work_dir) if args.work_dir else None, scenes=max(args.scenes, 300))
    args.pairs_dir = synthetic_pairs(ground) if args.pairs == "synthetic" else None
    runs = Path(tempfile.mkdtemp(prefix="dama-study-"))
    if args.select:
        args.settings, args.selection = select_settings(ground, args, runs)
    else:
        args.settings = {
            "beta": TRAINING["beta"],
            "lr": TRAINING["learning_rate"],
            "filter_sigma": TRAINING["filter_sigma"],
            "keep_ratio": 0.8,
        }
        args.selection = ["Settings: the proving ground's (not chosen on validation scenes in this run: see --select)."]
    print(f"[study] settings: {args.settings}", flush=True)
    rows = []
    for seed in range(args.seeds):
        for method in args.methods.split(","):
            variants = [{}, *EXTRA.get(method, [])]
            for number, objective in enumerate(variants):
                if objective and all(args.settings.get(key) == value for key, value in objective.items()):
                    continue  # the variant is what the chosen settings already run
                out = runs / f"{method}-{number}-{seed}"
                row = _run(ground, out, method, seed, args, **objective)
                print(json.dumps(row), flush=True)
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)
    _write_results(rows, args, command.strip(), time.monotonic() - started)
    print(f"[study] wrote {args.results} in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
