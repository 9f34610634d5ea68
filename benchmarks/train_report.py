"""``bench_train.py``'s report: the table of ratios to TRL and the ``summary`` line, from the JSON records."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def e2e(step_pairs_per_s: float, reference_pairs_per_s: float | None, epochs: int) -> float | None:
    """Pairs/s per epoch with the reference pre-pass amortised over ``epochs``."""
    if not reference_pairs_per_s:
        return None
    return 1.0 / (1.0 / step_pairs_per_s + 1.0 / (epochs * reference_pairs_per_s))


def _reference_key(record: dict[str, Any]) -> str:
    return record["forward"] + ("/compiled" if record.get("compiled") else "")


def report(records: list[dict[str, Any]], args: argparse.Namespace, device_type: str, started: float) -> None:
    """The table of ratios to TRL and the ``summary`` line, from the records the children printed."""
    ok = [r for r in records if "pairs_per_s" in r and "kind" in r]
    trl = [r for r in ok if r.get("kind") == "trl"]
    engine = [r for r in ok if r.get("kind") == "engine"]
    reference = {_reference_key(r): r["pairs_per_s"] for r in ok if r.get("kind") == "reference"}
    hardness = next((r["pairs_per_s"] for r in ok if r.get("kind") == "hardness"), None)
    epochs = args.epochs
    name = args.workload.name
    anchor = max(trl, key=lambda r: r["pairs_per_s"]) if trl else None
    print(f"\n## {name}: ratio of pairs/s to TRL measured in this run", flush=True)
    if anchor:
        print(
            f"TRL anchor: {anchor['config']} {anchor['pairs_per_s']} pairs/s, peak {anchor['peak_mem_gib']} GiB "
            f"({anchor['mem_kind']}); reference pass amortised over {epochs} epochs; device {device_type}"
        )
    else:
        print("TRL anchor: not measured in this run (no trl/datasets, --no-trl, an error or the budget)")
    header = "| config | pairs/s | ratio | e2e pairs/s | e2e ratio | peak GiB | TFLOP/s | MFU |"
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for record in trl + sorted(engine, key=lambda r: -r["pairs_per_s"]):
        if record["kind"] == "trl":
            total = record["pairs_per_s"]  # TRL runs the reference inside every step
        else:
            # The trainer compiles the reference pass too when it compiles the step (optim.compile).
            ref = reference.get(_reference_key(record)) or reference.get(record["forward"])
            total = e2e(record["pairs_per_s"], ref, epochs)
        ratio = record["pairs_per_s"] / anchor["pairs_per_s"] if anchor else None
        total_ratio = total / anchor["pairs_per_s"] if anchor and total else None
        rows.append((record, total, ratio, total_ratio))

        def fmt(value: float | None, digits: int = 2) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        print(
            f"| {record['config']} | {record['pairs_per_s']:.3f} | {fmt(ratio)} | {fmt(total, 3)} | "
            f"{fmt(total_ratio)} | {record['peak_mem_gib']:.2f} | {fmt(record.get('tflops'))} | "
            f"{fmt(record.get('mfu'), 3)} |"
        )
    for forward, value in reference.items():
        print(f"reference pre-pass ({forward}): {value:.3f} pairs/s")
    if hardness is not None:
        print(f"hardness pre-pass (CLIP, float32): {hardness:.2f} pairs/s")
    best = max((r for r in rows if r[0]["kind"] == "engine"), key=lambda r: r[1] or 0.0, default=None)
    summary: dict[str, Any] = {"config": "summary", "workload": name, "epochs": epochs}
    if anchor:
        summary["trl_pairs_per_s"] = anchor["pairs_per_s"]
        summary["trl_peak_mem_gib"] = anchor["peak_mem_gib"]
    if best:
        record, total, ratio, total_ratio = best
        summary.update(
            {
                "best_engine": record["config"],
                "best_step_ratio": round(ratio, 3) if ratio else None,
                "best_e2e_pairs_per_s": round(total, 3) if total else None,
                "best_e2e_ratio": round(total_ratio, 3) if total_ratio else None,
            }
        )
        if total and hardness:
            # dama / dama_data also score the data once (cached like the reference): amortised the same way.
            with_hardness = 1.0 / (1.0 / total + 1.0 / (epochs * hardness))
            summary["best_e2e_with_hardness_pairs_per_s"] = round(with_hardness, 3)
            if anchor:
                summary["best_e2e_with_hardness_ratio"] = round(with_hardness / anchor["pairs_per_s"], 3)
    if anchor:
        checkpointed = [r for r in rows if r[0]["kind"] == "engine" and r[0]["gc"] and r[1]]
        under_trl_memory = [r for r in checkpointed if r[0]["peak_mem_gib"] <= anchor["peak_mem_gib"]]
        if under_trl_memory:
            record, total, _, total_ratio = max(under_trl_memory, key=lambda r: r[1])
            summary["best_gc_within_trl_memory"] = record["config"]
            summary["best_gc_within_trl_memory_e2e_ratio"] = round(total_ratio, 3) if total_ratio else None
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(summary) + "\n")
