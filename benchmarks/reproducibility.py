"""Where do the proving ground's figures diverge between CPUs: the seeing base's training, or its sampling?

    python benchmarks/reproducibility.py                  # every kernel set this CPU has, at 1 and 2 threads
    python benchmarks/reproducibility.py --pair-scenes 100 --greedy-scenes 50

torch picks its CPU kernels by the instruction sets it finds (``ATEN_CPU_CAPABILITY`` overrides: ``default``,
``avx2``, ``avx512``); a machine with other instruction sets, or another thread count, adds floating-point numbers
in another order. Each variant (kernel set x thread count) runs in its own process and

1. builds the seeing base with the proving ground's recipe (``dama_engine.proving.BASE``): sha256 of its weights and
   the largest weight difference from the first variant's;
2. samples on-policy pairs from its own base (``--pair-scenes`` scenes, the proving ground's settings): pair count
   and whether the sampled texts equal the first variant's;
3. samples the same pairs from the *first variant's* base, under its own kernels: this isolates the sampling;
4. decodes ``--greedy-scenes`` held-out scenes greedily from its own base: answers that differ from the first
   variant's.

It prints a table and writes it (Markdown and JSON) to ``--out`` (default ``docs/measurements/reproducibility.md``).
Kernel sets the CPU lacks are reported as such (torch falls back silently; the run would only repeat another).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("default", "avx2", "avx512")
CPU_FLAG = {"default": None, "avx2": "avx2", "avx512": "avx512f"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _texts_digest(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    joined = "\n".join(f"{row['chosen'][0]['content']}\t{row['rejected'][0]['content']}" for row in rows)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _pairs(base: Path, out: Path, scenes: int) -> dict[str, Any]:
    from dama_engine.proving.ground import IMAGE_SIZE, PAIRS
    from dama_engine.proving.on_policy import on_policy_pairs

    counts = on_policy_pairs(
        base,
        out,
        scenes=scenes,
        seed=PAIRS["seed"],
        samples=PAIRS["samples"],
        temperature=PAIRS["temperature"],
        image_size=IMAGE_SIZE,
    )
    return {"pairs": counts["pairs"], "digest": _texts_digest(out / "train.jsonl") + _texts_digest(out / "eval.jsonl")}


def _greedy(base: Path, scenes_dir: Path, count: int) -> list[str]:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dama_engine.forward import GenerationRequest, GenerationSettings, generate

    rows = [json.loads(line) for line in (scenes_dir / "generative_eval.jsonl").read_text().splitlines()][:count]
    requests = [
        GenerationRequest.from_prompt(row["prompt"], [Image.open(scenes_dir / row["image"]).convert("RGB")])
        for row in rows
    ]
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)
    return generate(model, processor, requests, GenerationSettings(max_new_tokens=40, temperature=0.0), batch_size=32)


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant, in this process (its environment already holds the kernel set and the thread count)."""
    import torch
    from safetensors.torch import load_file

    from dama_engine.proving import BASE, build_seeing_base
    from dama_engine.threads import apply_threads

    apply_threads()
    work = Path(spec["work"])
    started = time.monotonic()
    base = build_seeing_base(work / "base", **BASE)
    weights = base / "model.safetensors"
    result: dict[str, Any] = {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:16],
        "build_s": round(time.monotonic() - started, 1),
    }
    reference = Path(spec["reference"]) if spec.get("reference") else None
    if reference is not None:
        mine, theirs = load_file(weights), load_file(reference / "model.safetensors")
        result["max_weight_diff"] = max(float((mine[name] - theirs[name]).abs().max()) for name in mine)
    result["own_pairs"] = _pairs(base, work / "pairs", spec["pair_scenes"])
    if reference is not None:
        result["reference_base_pairs"] = _pairs(reference, work / "pairs-on-reference", spec["pair_scenes"])
    result["greedy"] = _greedy(base, Path(spec["scenes"]), spec["greedy_scenes"])
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="thread counts (comma-separated)")
    parser.add_argument("--pair-scenes", type=int, default=200)
    parser.add_argument("--greedy-scenes", type=int, default=100)
    parser.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dama-repro")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements" / "reproducibility.md")
    parser.add_argument("--variant", type=Path, help=argparse.SUPPRESS)  # internal: run one variant's spec file
    args = parser.parse_args(argv)
    if args.variant:
        spec = json.loads(args.variant.read_text())
        Path(spec["result"]).write_text(json.dumps(run_variant(spec)))
        return 0

    from dama_engine.proving.ground import IMAGE_SIZE, SCENES
    from dama_engine.proving.shapes import make_demo_dataset

    started = time.monotonic()
    scenes = args.work_dir / "scenes"
    if not (scenes / "generative_eval.jsonl").is_file():
        make_demo_dataset(
            scenes, n_train=0, n_eval=0, n_generative=args.greedy_scenes, image_size=IMAGE_SIZE, seed=SCENES["seed"]
        )
    flags = _cpu_flags()
    available = [cap for cap in CAPABILITIES if CPU_FLAG[cap] is None or CPU_FLAG[cap] in flags]
    missing = [cap for cap in CAPABILITIES if cap not in available]
    variants = [(cap, int(threads)) for cap in available for threads in args.threads.split(",")]
    results: list[dict[str, Any]] = []
    reference: Path | None = None
    for cap, threads in variants:
        work = args.work_dir / f"{cap}-t{threads}"
        spec = {
            "work": str(work),
            "reference": str(reference) if reference else None,
            "pair_scenes": args.pair_scenes,
            "greedy_scenes": args.greedy_scenes,
            "scenes": str(scenes),
            "result": str(work / "result.json"),
        }
        work.mkdir(parents=True, exist_ok=True)
        (work / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "DAMA_TORCH_THREADS": str(threads)}
        env["OMP_NUM_THREADS"] = str(threads)
        print(f"[repro] {cap}, {threads} thread(s) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--variant", str(work / "spec.json")], env=env, check=True)
        row = {"requested": cap, **json.loads((work / "result.json").read_text())}
        results.append(row)
        reference = reference or work / "base"
        print(f"[repro] {json.dumps({k: v for k, v in row.items() if k != 'greedy'})}", flush=True)
    first = results[0]
    lines = [
        "# Reproducibility of the proving ground across CPU kernels and thread counts",
        "",
        f"`python benchmarks/reproducibility.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(
            " `", "`"
        )
        + f": {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores; "
        f"{(time.monotonic() - started) / 60:.1f} min. Kernel sets this CPU lacks: {', '.join(missing) or 'none'}. "
        f"Reference: the first row. Pairs from {args.pair_scenes} scenes, greedy answers on {args.greedy_scenes}.",
        "",
        "| kernels (torch reports) | threads | weights sha256 | max weight diff | pairs (own base) | same texts "
        "| pairs (reference base) | same texts | greedy answers differing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        on_reference = row.get("reference_base_pairs", row["own_pairs"])
        differing = sum(a != b for a, b in zip(row["greedy"], first["greedy"], strict=True))
        lines.append(
            f"| {row['requested']} ({row['capability']}) | {row['threads']} | {row['weights_sha256']} | "
            f"{row.get('max_weight_diff', 0.0):.2e} | {row['own_pairs']['pairs']} | "
            f"{'yes' if row['own_pairs']['digest'] == first['own_pairs']['digest'] else 'no'} | "
            f"{on_reference['pairs']} | {'yes' if on_reference['digest'] == first['own_pairs']['digest'] else 'no'} | "
            f"{differing} of {len(row['greedy'])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
