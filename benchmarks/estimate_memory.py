"""The estimate's memory model (``dama_engine.training.estimate``) against what a real training step holds, on a CPU.

    python benchmarks/estimate_memory.py [--json OUT]

For each configuration (tiny LLaVA widened to ``--hidden`` sizes; LoRA without and with dropout, or a full
fine-tune; gradient checkpointing off or on; 2 or 4 pairs per step; the ``packed`` and ``two_rows`` layouts) it
runs the engine's own ``train`` for two steps on the demo's pairs of one length (float32, eager layers, one
thread) under torch's profiler, and takes the peak of the live tensor bytes its allocation and free events add up
to over the run: the weights as the engine loads them, AdamW's states, the gradients, what autograd keeps for
backward and the temporaries, as ``torch.cuda.max_memory_allocated`` counts them on a GPU.

The process's RSS is not used: on a CPU it is mostly libraries and the allocator's cache. It prints one line per
configuration (measured, estimated, error) and the largest error; the issue's bar is 20%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

from dama_engine.config import parse_config
from dama_engine.models import build_tiny_model
from dama_engine.proving import make_demo_dataset
from dama_engine.threads import apply_threads
from dama_engine.training import train
from dama_engine.training.estimate import Setup, count_model, measure_lengths, memory_parts, peak_bytes

MIB = 2**20


def peak_tensor_bytes(events: list[Any]) -> int:
    """The peak of live tensor bytes over a profile: its allocation (+) and free (-) events, in time order."""
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(values: dict[str, Any]) -> dict[str, Any]:
    """One configuration: the measured bytes and the estimate's, by part."""
    config = parse_config(values)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        train(config)
    events = [e for e in profiled.profiler.kineto_results.events() if e.name() == "[memory]"]
    measured = peak_tensor_bytes(events)
    counts = count_model(config)
    lengths = measure_lengths(config, max_rows=512)
    optim = config.optim
    setup = Setup("ddp", optim.gradient_checkpointing, optim.batch_size, 1)
    estimated = memory_parts(counts, lengths, setup, bf16=False, lora=config.lora.enabled, compiled=False, cuda=False)
    total = peak_bytes(estimated)
    return {
        "peak_measured_mib": round(measured / MIB, 3),
        "peak_estimated_mib": round(total / MIB, 3),
        "error": round(total / measured - 1, 4),
        "estimated_parts_mib": {k: round(v / MIB, 3) for k, v in estimated.items() if v},
    }


def uniform_rows(source: Path, target: Path) -> Path:
    """The demo's pairs about two-object scenes only: pairs of one length (up to a token), so the batches a run
    draws are the estimate's worst batch (the ``batch_size`` longest pairs), not lighter ones."""
    rows = [line for line in source.read_text().splitlines() if len(json.loads(line)["objects"]) == 2]
    target.write_text("\n".join(rows) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", default="128,256", help="comma-separated widths of the tiny LLaVA")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    apply_threads()
    records = []
    with tempfile.TemporaryDirectory(prefix="dama-estimate-") as folder:
        work = Path(folder)
        demo = make_demo_dataset(work / "demo", n_train=96, n_eval=0, n_generative=0, image_size=64)
        train = uniform_rows(demo.train, demo.train.parent / "uniform.jsonl")
        for hidden in (int(h) for h in args.hidden.split(",")):
            model_dir = build_tiny_model("llava", work / f"llava{hidden}", hidden_size=hidden)
            for lora, dropout in ((True, 0.0), (True, 0.05), (False, 0.0)):
                for checkpointing in (False, True):
                    for batch, layout in ((2, "packed"), (4, "packed"), (4, "two_rows")):
                        kind = ("lora" if not dropout else "lora_dropout") if lora else "full"
                        name = f"h{hidden}/{kind}/gc_{'on' if checkpointing else 'off'}/b{batch}/{layout}"
                        values = {
                            "model": {"name_or_path": str(model_dir), "precision": "fp32"},
                            "data": {"train": str(train)},
                            "lora": {"enabled": lora, "r": 16, "alpha": 32, "dropout": dropout},
                            "objective": {"method": "dpo"},
                            "optim": {
                                "batch_size": batch,
                                "max_steps": 2,
                                "gradient_checkpointing": checkpointing,
                                "pair_forward": layout,
                                "compile": "off",
                            },
                            "evaluation": {"enabled": False},
                            "run": {"output_dir": str(work / "runs" / name), "resume": False, "log_every": 1},
                        }
                        record = {"config": name, **measure(values)}
                        records.append(record)
                        print(json.dumps(record), flush=True)
    worst = max(records, key=lambda r: abs(r["error"]))
    print(f"largest error of the peak: {worst['error']:+.1%} ({worst['config']}); bar: 20%")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0 if abs(worst["error"]) <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
