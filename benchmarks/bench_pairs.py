"""Pair generation's sampling speed: samples/s with many prompts per ``generate`` call against one at a time.

    python benchmarks/bench_pairs.py                      # the proving ground's seeing base, 16 scenes x 8 samples
    python benchmarks/bench_pairs.py --model PATH --generative G.jsonl --vocabulary V.json

Three ways to sample the same ``prompts x samples`` answers with :func:`dama_engine.forward.generate` and the
per-sample seeds pair generation uses (:func:`dama_engine.pairs.sample_seed`):

* ``one at a time``: one sample per ``generate`` call (batch 1), what a plain loop over prompts and samples does;
* ``per prompt``: one prompt's samples per call (``samples`` rows);
* ``batched``: ``prompts_per_batch`` prompts' samples per call, as ``dama-pairs`` runs.

The modes take turns ``--repeats`` times and each keeps its fastest run (a shared machine's neighbours load
them alike).

Only generation is timed (the model is loaded and warmed up first; judging takes milliseconds). With per-sample
seeds every mode gives the same answers; the script checks that (exactly equal on a CPU) and prints samples/s per
mode and the ratios against ``one at a time``. The default model is the seeing base of the proving ground (built
once and cached under ``DAMA_PROVING_DIR`` or ``~/.cache/dama/proving``), prompted with its held-out scenes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dama_engine.threads import apply_threads  # noqa: E402


def _seeing_base() -> tuple[Path, Path, Path]:
    """The proving ground's seeing base and held-out scenes (built if missing; the pairs are not needed)."""
    from dama_engine.model_files import code_version, stamped, write_stamp
    from dama_engine.proving.ground import BASE, IMAGE_SIZE, SCENES, STAMP, ground_at
    from dama_engine.proving.seeing_base import build_seeing_base
    from dama_engine.proving.shapes import make_demo_dataset

    ground = ground_at()
    build_seeing_base(ground.base, **BASE)
    wanted = {**SCENES, "image_size": IMAGE_SIZE, "code": code_version("scenes")}
    if not stamped(ground.scenes, STAMP, wanted, "generative_eval.jsonl"):
        make_demo_dataset(
            ground.scenes, n_train=0, n_eval=0, n_generative=SCENES["count"], image_size=IMAGE_SIZE, seed=SCENES["seed"]
        )
        write_stamp(ground.scenes, STAMP, wanted)
    return ground.base, ground.generative, ground.vocabulary


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dama_engine.config import ModelSection
    from dama_engine.data import load_generative_eval
    from dama_engine.evaluation import resolve_device
    from dama_engine.forward import GenerationRequest, GenerationSettings, generate
    from dama_engine.models import load_model, load_processor, resolve_dtype
    from dama_engine.pairs import sample_seed

    if args.model is None:
        model_path, generative, vocabulary = _seeing_base()
    else:
        model_path, generative, vocabulary = Path(args.model), Path(args.generative), Path(args.vocabulary)
    section = ModelSection(name_or_path=str(model_path), precision=args.precision)
    device = resolve_device(args.device)
    model = load_model(section, dtype=resolve_dtype(section.precision, device)).to(device).eval()
    processor = load_processor(section)
    prompts = load_generative_eval(generative, vocabulary).samples[: args.prompts]
    settings = GenerationSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
    requests = [GenerationRequest.from_prompt(p.prompt, [p.image]) for p in prompts for _ in range(args.samples)]
    seeds = [sample_seed(0, p.sample_id, k) for p in prompts for k in range(args.samples)]
    modes = {"one at a time": 1, "per prompt": args.samples, "batched": args.samples * args.prompts_per_batch}

    def run(batch_size: int) -> tuple[float, list[str]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        answers = generate(model, processor, requests, settings, batch_size=batch_size, row_seeds=seeds)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, answers

    warm = modes["batched"]  # one batched call first: lazy initialisation and allocator warm-up are not timed
    generate(model, processor, requests[:warm], settings, batch_size=warm, row_seeds=seeds[:warm])
    # Modes take turns in every repeat, so a neighbour's load on a shared machine falls on all of them alike.
    timings: dict[str, list[float]] = {name: [] for name in modes}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, batch_size in modes.items():
            seconds, answers[name] = run(batch_size)
            timings[name].append(seconds)
    results: dict[str, Any] = {}
    for name, batch_size in modes.items():
        seconds = min(timings[name])
        results[name] = {
            "batch_rows": batch_size,
            "seconds": round(seconds, 3),
            "all_seconds": [round(t, 3) for t in timings[name]],
            "samples_per_s": len(requests) / seconds,
        }
    base = results["one at a time"]["samples_per_s"]
    for row in results.values():
        row["ratio"] = round(row["samples_per_s"] / base, 2)
        row["samples_per_s"] = round(row["samples_per_s"], 1)
    same = {name: sum(a == b for a, b in zip(answers[name], answers["one at a time"], strict=True)) for name in modes}
    words = sum(len(answer.split()) for answer in answers["batched"]) / len(requests)
    return {
        "model": str(model_path),
        "prompts": len(prompts),
        "samples_per_prompt": args.samples,
        "samples": len(requests),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "mean_words_per_answer": round(words, 1),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "load_average_after": [round(load, 2) for load in os.getloadavg()],
        "machine": platform.machine(),
        "answers_equal_to_one_at_a_time": same,
        "modes": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: the proving ground's seeing base)")
    parser.add_argument("--generative", help="generative set JSONL (with --model)")
    parser.add_argument("--vocabulary", help="its vocabulary.json (with --model)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts-per-batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, in turns; the fastest counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.model is not None and (args.generative is None or args.vocabulary is None):
        parser.error("--model needs --generative and --vocabulary")
    apply_threads()
    results = measure(args)
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
