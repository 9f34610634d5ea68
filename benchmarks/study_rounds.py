"""The rounds study: does a second and third round of sample -> train -> evaluate lower hallucination further than
one round, and more than one round trained as long as three? Measured in the proving ground through the API.

    python benchmarks/study_rounds.py --quick    # 1 seed, 2 rounds, 400 scenes sampled, 100 steps (about 8 min)
    python benchmarks/study_rounds.py            # 3 seeds, 3 rounds, 1,600 scenes, 300 steps per round

It starts the embedded service (``dama serve``: SQLite, a local broker, one worker) in a folder of its own, uploads
the shapes world's scenes as two generative sets (those the rounds sample pairs from, and the proving ground's 300
held-out scenes, drawn with their own seeds as the demo draws them), and for each seed posts two loops on the seeing
base (``dama/tiny-seeing-llava``) with the demo's settings (:func:`worker.serve.demo_loop_spec`):

- ``rounds``: 3 rounds of ``--steps`` steps each; its rounds 1, 2 and 3 are the 1-, 2- and 3-round arms (a loop's
  round k does not depend on the rounds after it, so one loop gives all three);
- ``matched``: 1 round trained for 3 x ``--steps`` steps, the 3-round loop's optimizer steps in one round (one
  pair generation instead of three).

A seed sets both the pair generation's sampling seed and the training seed: each seed resamples the pairs. Per arm:
CHAIR_i, CHAIR_s and coverage on the held-out scenes (mean and sd over seeds), the pairs each round made, paired
per-seed differences (t-test with n - 1 degrees of freedom and sign test, :mod:`dama_engine.proving.stats`), and
the objects the remaining hallucinations name after each round (from each evaluation's per-scene outputs). POPE is
not measured: the seeing base was never taught to answer yes/no questions, so its POPE figures would mean nothing.

Writes its tables into ``docs/RESULTS.md`` between ``<!-- rounds:begin -->`` and ``<!-- rounds:end -->`` (added at
the end the first time), the per-run rows into ``docs/measurements/rounds.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from dama_engine.proving.ground import IMAGE_SIZE, PAIRS, SCENES, default_root  # noqa: E402
from dama_engine.proving.shapes import make_demo_dataset  # noqa: E402
from dama_engine.proving.stats import paired_table  # noqa: E402
from jobstore.settings import Settings  # noqa: E402
from worker.engine_config import model_cache_root, seeing_base_dir  # noqa: E402
from worker.serve import _archive, demo_loop_spec  # noqa: E402

BEGIN, END = "<!-- rounds:begin -->", "<!-- rounds:end -->"
MEASURES = (("CHAIR_i", "chair_i"), ("CHAIR_s", "chair_s"), ("coverage", "coverage"))
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _service(home: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """``dama serve`` in ``home`` (the embedded default), its URL and environment, once its API answers."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DAMA_")}
    port = _free_port()
    env.update(
        DAMA_HOME=str(home),
        DAMA_API_PORT=str(port),
        DAMA_LOOPS_MAX_ACTIVE="16",
        DAMA_LOOPS_MAX_ROUNDS="5",
    )
    log = (home / "serve.log").open("wb")
    process = subprocess.Popen([str(VENV_BIN / "dama"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url, env
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the service did not start; see {home / 'serve.log'}")
        time.sleep(0.5)


def _upload(client: httpx.Client, archive: Path) -> str:
    with archive.open("rb") as handle:
        response = client.post("/datasets", files={"file": (archive.name, handle)}, data={"format": "generative"})
    response.raise_for_status()
    return str(response.json()["id"])


def _hallucinated_objects(client: httpx.Client, evaluation_id: str, which: str = "tuned") -> collections.Counter[str]:
    """How often a model of an evaluation (``tuned``, or the plain ``base``) named each object that is not in the
    scene, over the held-out scenes (the evaluation's per-scene outputs)."""
    text = client.get(f"/evaluations/{evaluation_id}/outputs").text
    named: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if line.strip():
            named.update((json.loads(line).get(which) or {}).get("hallucinated") or [])
    return named


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _report(rows: list[dict[str, Any]], bases: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    lines = [
        BEGIN,
        "## Rounds on the server (loops through the API)",
        "",
        f"Command: `{command}` ({len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}: {args.seeds}; "
        f"{args.prompts} scenes sampled per round, {args.steps} steps per round, {args.scenes} held-out scenes; "
        f"{platform.machine()}, {os.cpu_count()} CPUs; {args.minutes:.0f} min). Written by "
        "`benchmarks/study_rounds.py`; per-run rows in `docs/measurements/rounds.json`. The seeing base, the demo's "
        "settings per round (beta 2, filter width 5, lr 3e-4, batch 16, LoRA r 16 with the projector), pairs "
        "sampled by the service from the previous round's adapter (round 1: the base). POPE is not measured: the "
        "seeing base was never taught yes/no questions.",
        "",
        "| arm | optimizer steps | pairs per round | " + " | ".join(name for name, _ in MEASURES) + " |",
        "|---|---|---|" + "---|" * len(MEASURES),
    ]
    base_cells = [_mean_sd([base[key] for base in bases]) for _, key in MEASURES]
    lines.append("| base | 0 | - | " + " | ".join(base_cells) + " |")
    for arm in arms:
        runs = [row for row in rows if row["arm"] == arm]
        pairs = ", ".join("/".join(str(p) for p in row["pairs"]) for row in runs)
        cells = [_mean_sd([row[key] for row in runs]) for _, key in MEASURES]
        lines.append(f"| {arm} | {runs[0]['steps']} | {pairs} | " + " | ".join(cells) + " |")
    measures = {name: (lambda row, key=key: row[key]) for name, key in MEASURES}
    if len(args.seeds) >= 2:
        lines += ["", f"Paired per seed against `{arms[0]}` (difference arm - {arms[0]}):", ""]
        lines += paired_table(rows, arm_key="arm", reference=arms[0], measures=measures)
        matched = [row for row in rows if row["arm"] in (arms[-1], arms[-2])]
        lines += ["", f"The compute-matched control: `{arms[-2]}` against `{arms[-1]}` (same optimizer steps):", ""]
        lines += paired_table(matched, arm_key="arm", reference=arms[-1], measures=measures)
    lines += ["", "Objects the remaining hallucinations name (summed over seeds; the 8 most named):", ""]
    lines += ["| after | hallucinated objects named (count) |", "|---|---|"]
    for label, counts in [("base", _sum(base["objects"] for base in bases))] + [
        (arm, _sum(row["objects"] for row in rows if row["arm"] == arm)) for arm in arms
    ]:
        top = ", ".join(f"{name} ({count})" for name, count in counts.most_common(8)) or "none"
        lines.append(f"| {label} | {top} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _sum(counters: Any) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for counts in counters:
        total.update(counts)
    return total


def _write(report: str, results: Path) -> None:
    text = results.read_text() if results.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + report + text[text.index(END) + len(END) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + report
    results.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 400 scenes, 100 steps, 100 scenes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the loop arm (default 3; --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default 300)")
    parser.add_argument("--prompts", type=int, default=None, help="scenes sampled per round (default 1600)")
    parser.add_argument("--scenes", type=int, default=None, help="held-out scenes (default 300)")
    parser.add_argument("--work-dir", type=Path, default=None, help="the service's folder (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.rounds = args.rounds or (2 if quick else 3)
    args.steps = args.steps or (100 if quick else 300)
    args.prompts = args.prompts or (400 if quick else PAIRS["scenes"])
    args.scenes = args.scenes or (100 if quick else SCENES["count"])
    command = (
        "python benchmarks/study_rounds.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    started = time.monotonic()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dama-rounds-"))
    home = work / ".dama"
    home.mkdir(parents=True, exist_ok=True)
    built = default_root() / "base"
    seeing = seeing_base_dir(model_cache_root(Settings(home=home, scratch_dir=None, model_cache_dir=None)))
    if built.is_dir() and not seeing.exists():  # the proving ground's base (same recipe): no build in the worker
        shutil.copytree(built, seeing)
    process, url, env = _service(home)
    try:
        key = subprocess.run(
            [str(VENV_BIN / "dama"), "admin", "create-key", "--tenant", f"rounds-{secrets.token_hex(3)}"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            sampled = make_demo_dataset(
                folder / "s", n_train=0, n_eval=0, n_generative=PAIRS["scenes"], image_size=IMAGE_SIZE, seed=23
            )
            held = make_demo_dataset(
                folder / "h",
                n_train=0,
                n_eval=0,
                n_generative=SCENES["count"],
                image_size=IMAGE_SIZE,
                seed=SCENES["seed"],
            )
            sampled_id = _upload(client, _archive(folder / "sampled.zip", sampled.generative_eval, sampled.vocabulary))
            held_id = _upload(client, _archive(folder / "held.zip", held.generative_eval, held.vocabulary))
        loops: dict[tuple[str, int], str] = {}
        for seed in args.seeds:
            for arm, rounds, steps in (("rounds", args.rounds, args.steps), ("matched", 1, args.rounds * args.steps)):
                spec = demo_loop_spec(
                    sampled_id, held_id, rounds=rounds, steps=steps, scenes=args.scenes, prompts=args.prompts
                )
                spec["sampling"]["seed"] = seed
                spec["training"]["hyperparameters"]["seed"] = seed
                response = client.post("/loops", json=spec)
                response.raise_for_status()
                loops[(arm, seed)] = response.json()["id"]
                print(f"[rounds] seed {seed} {arm}: loop {response.json()['id']}", flush=True)
        ended: dict[tuple[str, int], dict[str, Any]] = {}
        while len(ended) < len(loops):
            time.sleep(15)
            for name, loop_id in loops.items():
                if name in ended:
                    continue
                loop = client.get(f"/loops/{loop_id}").json()
                if loop["status"] in ("succeeded", "failed", "cancelled"):
                    if loop["status"] != "succeeded":
                        raise SystemExit(f"[rounds] loop {loop_id} {loop['status']}: {loop.get('error')}")
                    ended[name] = loop
                    print(f"[rounds] {name} done after {(time.monotonic() - started) / 60:.1f} min", flush=True)
            running = sum(1 for name in loops if name not in ended)
            print(f"[rounds] {len(ended)} of {len(loops)} loops done, {running} left", flush=True)

        # The ended loops as the API gave them, before anything is derived from them.
        raw = {f"{arm} seed {seed}": loop for (arm, seed), loop in ended.items()}
        (work / "loops.json").write_text(json.dumps(raw, indent=2))
        rows: list[dict[str, Any]] = []
        bases: list[dict[str, Any]] = []
        for seed in args.seeds:
            loop = ended[("rounds", seed)]
            first_evaluation = loop["rounds"][0]["evaluation"]["id"]
            base_objects = _hallucinated_objects(client, first_evaluation, "base")
            bases.append({"seed": seed, **loop["base"], "objects": base_objects})
            pairs: list[int] = []
            for entry in loop["rounds"]:
                pairs.append(entry["pairs"])
                rows.append(
                    {
                        "arm": f"{entry['round']} round{'s' if entry['round'] > 1 else ''}",
                        "seed": seed,
                        "steps": entry["round"] * args.steps,
                        "pairs": list(pairs),
                        **{key: entry["metrics"][key] for _, key in MEASURES},
                        "objects": _hallucinated_objects(client, entry["evaluation"]["id"]),
                        "loop": loop["id"],
                    }
                )
            matched = ended[("matched", seed)]
            entry = matched["rounds"][0]
            rows.append(
                {
                    "arm": f"1 round, {args.rounds * args.steps} steps (compute-matched)",
                    "seed": seed,
                    "steps": args.rounds * args.steps,
                    "pairs": [entry["pairs"]],
                    **{key: entry["metrics"][key] for _, key in MEASURES},
                    "objects": _hallucinated_objects(client, entry["evaluation"]["id"]),
                    "loop": matched["id"],
                }
            )
        rows.sort(key=lambda row: (row["steps"] if "compute" not in row["arm"] else 10**9, row["seed"]))
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    args.minutes = (time.monotonic() - started) / 60
    report = _report(rows, bases, args, command)
    print(report)
    if not quick:
        _write(report, args.results)
        measurements = args.results.parent / "measurements" / "rounds.json"
        measurements.parent.mkdir(parents=True, exist_ok=True)
        serialisable = [{**row, "objects": dict(row["objects"])} for row in rows]
        measurements.write_text(json.dumps({"command": command, "rows": serialisable}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
