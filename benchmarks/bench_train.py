"""Training-step benchmark: this engine's pair forwards and every DAMA method, against TRL's DPOTrainer.

One random-weight model shape, one data set, one LoRA configuration (r=64, alpha 16, every projection of the
language model, no dropout), the same batches for everyone. Prints one JSON line per configuration, then a table
of ratios to TRL measured in the same run. The model shape is the engine's tiny LLaVA
(``dama_engine.models.tiny.build_tiny_model``: its processor, tokenizer and chat template) with the workload's
sizes: as built with ``--tiny``, LLaVA-1.5-7B's with ``--llava7b``; 336 px images (576 image tokens) in both.

This file holds the command line, the plan and the parent and child processes; the rest lies beside it:
``train_workloads.py`` (the workloads, the data, one child's run state), ``train_configs.py`` (the timed
configurations), ``train_measure.py`` (deadline, peak memory, saved-for-backward bytes), ``train_shapes.py`` (the
model shapes from the engine's tiny LLaVA, and the hardness CLIP) and ``train_report.py`` (the table, the summary).

Process isolation: the script (the parent) imports no model and touches no GPU; it runs the configurations in
child processes (``bench_train.py --only NAME,NAME,...``), each printing its JSON lines, and collects them. TRL
runs in children of its own; the engine's configurations share one child (one model, built once) and release
everything between configurations (optimizer, gradients, graphs, cached allocator blocks). A child that runs out
of memory, leaks device memory across a configuration, crashes or overruns is replaced by a fresh one for the
configurations left, so one failure cannot starve the rest of the run.

    python benchmarks/bench_train.py --tiny      # CPU smoke report, a minute or two; asserts nothing about speed
    python benchmarks/bench_train.py --llava7b   # GPU: the workload of shared/PERFORMANCE.md, about 3 minutes

What is timed (each configuration: ``--warmup`` steps, then the median of ``--steps`` synchronised steps):

* ``engine/<forward>/<method>/gc_<on|off>/b<N>``: the trainer's own step, ``dama_engine.training.step.train_step``, on
  pre-encoded batches (one micro-batch per step): forward under bf16 autocast (GPU), the objective with cached
  reference log-probs, backward, the state merge, gradient clipping, AdamW; metrics read back on the last timed
  step only (as ``run.log_every`` > 1 would). ``host_syncs_per_logging_step`` counts the host syncs of one more
  step (``dama_engine.training.host_syncs``). ``forward`` is a ``dama_engine.forward.packing.PairForward``:
  ``model_logits`` (the
  plain 2N-row layout with the model's own logits: the engine before the fast paths), ``two_rows`` (plain layout,
  answer-only head), ``packed`` (one row per pair). Encoding (image processor, tokenizer) is timed apart as
  ``encode_pairs_per_s``, as TRL's collation falls outside its step timer too.
* ``reference/<forward>``: the engine's reference pre-pass (adapter off, no grad), pairs/s. The trainer runs it once
  per data set and caches it; ``e2e_pairs_per_s`` amortises it over ``--epochs`` epochs:
  ``1 / (1 / step + 1 / (epochs * reference))``. TRL recomputes the reference inside every step.
* ``hardness``: DAMA's data-hardness pre-pass (``ClipHardnessScorer``) with a CLIP ViT-L/14-336-shaped random
  CLIPModel (``--llava7b``; a tiny CLIP with ``--tiny``), pairs/s.
* ``trl/gc_<on|off>/b<N>``: TRL's DPOTrainer as in shared/bench/trl_anchor.py (sigmoid DPO, reference = adapter
  off), timed by a step callback.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and the process's peak RSS (sampled) on a CPU.
TFLOP/s is an estimate of the matrix work executed: ``2 x (language-model parameters without the input
embedding) x tokens`` per pass (forward; backward to the inputs; the recomputation when checkpointing; TRL's
reference forward), plus the vision tower's forward per image; attention's quadratic part and LoRA are left out.
MFU divides it by a bf16 matrix product measured in the same run.

Each configuration runs in its own try/except (an error or OOM prints an ``error`` line and the run goes on); a
configuration that would not finish inside ``--budget-s`` is skipped with a ``skipped`` line. ``--only`` runs the
named configurations in this process (what the parent does per child; names as in the JSON lines, e.g.
``engine/packed/dama/gc_off/b4``, ``reference/packed``, ``agreement``, ``hardness``, ``trl/gc_on/b8``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout: the repository root goes on sys.path before the engine's imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.train_configs import agreement_config, engine_step_config, hardness_config, reference_config, trl_config
from benchmarks.train_measure import GIB, free_device, measure_matmul_peak
from benchmarks.train_report import report
from benchmarks.train_shapes import vision_tokens
from benchmarks.train_workloads import LLAVA7B, TINY, Run, Workload, build_data, single_token_words
from dama_engine.objective.loss import PREFERENCE_METHODS
from dama_engine.threads import apply_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny", action="store_true", help="CPU smoke report on a tiny LLaVA")
    mode.add_argument("--llava7b", action="store_true", help="GPU: LLaVA-1.5-7B shape, bf16 (shared/PERFORMANCE.md)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them")
    parser.add_argument(
        "--methods", default=",".join(PREFERENCE_METHODS), help="DAMA methods to time (comma-separated)"
    )
    parser.add_argument("--forwards", default="packed,two_rows,model_logits", help="engine pair forwards to time")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: DAMA_TORCH_THREADS, else 1; see dama_engine.threads); reported in env",
    )
    parser.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default=None,
        help="time the engine with its decoder layers compiled (optim.compile), eager, or both "
        "(default: both with --llava7b, off with --tiny)",
    )
    parser.add_argument(
        "--extra",
        default="",
        help="more configurations to time after the others, e.g. engine/packed/dama/gc_off/b8/compiled "
        "(default with --llava7b: packed, compiled, 8 pairs without checkpointing and 12 with it)",
    )
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (also skipped when trl is not installed)")
    parser.add_argument("--no-hardness", action="store_true", help="skip the hardness pre-pass")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: the first checkpointing/batch setting and one TRL run only"
    )
    parser.add_argument("--ref-pairs", type=int, default=None, help="pairs in the timed reference pre-pass")
    parser.add_argument("--hardness-pairs", type=int, default=None, help="pairs in the timed hardness pre-pass")
    parser.add_argument("--epochs", type=int, default=4, help="epochs the reference pre-pass is amortised over")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument(
        "--only", default=None, help="run these configurations (comma-separated names) in this process: a child's job"
    )
    parser.add_argument(
        "--child-timeout-s", type=float, default=None, help="wall-clock limit of one child process (default: budget)"
    )
    parser.add_argument("--deadline-unix", type=float, default=None, help=argparse.SUPPRESS)  # set for children
    parser.add_argument("--matmul-tflops", type=float, default=None, help=argparse.SUPPRESS)  # set for children
    args = parser.parse_args(argv)
    workload = TINY if args.tiny else LLAVA7B
    if args.quick:
        workload = replace(workload, main_grid=workload.main_grid[:1], trl_extra=())
    args.workload = workload
    args.steps = args.steps if args.steps is not None else workload.steps
    args.warmup = args.warmup if args.warmup is not None else workload.warmup
    args.ref_pairs = args.ref_pairs if args.ref_pairs is not None else workload.ref_pairs
    args.hardness_pairs = args.hardness_pairs if args.hardness_pairs is not None else workload.hardness_pairs
    args.budget_s = args.budget_s if args.budget_s is not None else workload.budget_s
    args.compile = args.compile or ("both" if args.llava7b else "off")
    args.extra = [name for name in args.extra.split(",") if name]
    args.methods = [m for m in args.methods.split(",") if m]
    args.forwards = [f for f in args.forwards.split(",") if f]
    if args.llava7b and args.methods and not args.extra and args.compile != "off" and "packed" in args.forwards:
        # The best batch sizes with compiled layers on an H100 (docs/PERFORMANCE.md): 8 without checkpointing
        # (51 GiB), 12 with it (21 GiB, within TRL's 22.5).
        headline = "dama" if "dama" in args.methods else args.methods[0]
        args.extra = [f"engine/packed/{headline}/gc_off/b8/compiled", f"engine/packed/{headline}/gc_on/b12/compiled"]
    unknown = [m for m in args.methods if m not in PREFERENCE_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(PREFERENCE_METHODS)}")
    forwards = ("packed", "two_rows", "model_logits")
    if not args.methods or any(f not in forwards for f in args.forwards):
        parser.error(f"--methods must name at least one method and --forwards only {', '.join(forwards)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/stat") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# ---- the plan (parent) ----------------------------------------------------------------------------------------

REPORT_RESERVE_S = 3.0  # kept for the table at the end
CHILD_GRACE_S = 20.0  # past the deadline a child gets to print its last line before the parent kills it
MIN_CHILD_S = 12.0  # a child needs this long at least (imports, data, CUDA context) to measure anything
LEAK_LIMIT = 256 * 2**20  # device memory a configuration may leave behind before its child is replaced


def engine_name(forward: str, method: str, checkpointing: bool, size: int, compiled: bool = False) -> str:
    name = f"engine/{forward}/{method}/gc_{'on' if checkpointing else 'off'}/b{size}"
    return name + "/compiled" if compiled else name


def trl_name(checkpointing: bool, size: int) -> str:
    return f"trl/gc_{'on' if checkpointing else 'off'}/b{size}"


def plan(args: argparse.Namespace, want_trl: bool, cuda: bool) -> list[list[str]]:
    """Groups of configuration names, in priority order (the budget cuts the tail); one child per group.

    TRL gets children of its own; the engine's configurations share one child and one model.
    """
    workload: Workload = args.workload
    first = ["env"] + (["matmul_peak"] if cuda else [])
    if want_trl:
        first += [trl_name(checkpointing, size) for checkpointing, size in workload.trl_grid]
    headline = "dama" if "dama" in args.methods else args.methods[0]
    fast = [f for f in ("packed", "two_rows") if f in args.forwards]
    # Compiled layers first when both are timed (the headline), then the eager ones.
    variants = {"off": [False], "on": [True], "both": [True, False]}[args.compile]
    engine = ["model"]
    for index, compiled in enumerate(variants):
        engine += [engine_name(f, headline, gc_on, size, compiled) for f in fast for gc_on, size in workload.main_grid]
        if index == 0:
            engine += args.extra  # the best batch sizes, before the eager configurations
        engine += [f"reference/{f}" + ("/compiled" if compiled else "") for f in fast]
    engine.append("agreement")
    if not args.no_hardness:
        engine.append("hardness")
    sweep_gc, sweep_size = workload.main_grid[0]
    sweep_forward = fast[:1] or ["model_logits"]
    engine += [
        engine_name(f, m, sweep_gc, sweep_size, variants[0])
        for m in args.methods
        if m != headline
        for f in sweep_forward
    ]
    if "model_logits" in args.forwards:
        engine += [engine_name("model_logits", headline, gc_on, size) for gc_on, size in workload.main_grid]
        engine.append("reference/model_logits")
    groups = [first, engine]
    if want_trl and workload.trl_extra:
        groups.append([trl_name(checkpointing, size) for checkpointing, size in workload.trl_extra])
    return groups


def child_command(args: argparse.Namespace, names: list[str], deadline_unix: float, matmul: float | None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--tiny" if args.tiny else "--llava7b"]
    command += ["--only", ",".join(names), "--deadline-unix", f"{deadline_unix:.3f}"]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--epochs", str(args.epochs)]
    command += ["--ref-pairs", str(args.ref_pairs), "--hardness-pairs", str(args.hardness_pairs)]
    command += ["--methods", ",".join(args.methods), "--forwards", ",".join(args.forwards)]
    command += ["--compile", args.compile, "--threads", str(args.threads)]
    command += ["--budget-s", str(args.budget_s)]
    if args.quick:
        command.append("--quick")
    if args.no_trl:
        command.append("--no-trl")
    if matmul:
        command += ["--matmul-tflops", str(matmul)]
    return command


def run_child(command: list[str], timeout_s: float, on_record: Callable[[dict[str, Any]], None]) -> tuple[int, bool]:
    """Run one child, handing each JSON line it prints to ``on_record`` as it comes; (exit status, timed out).

    Its stderr goes straight to ours; other stdout lines (a library's print) go to our stderr.
    """
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        child.kill()  # this child only, by its own handle

    timer = threading.Timer(max(timeout_s, 1.0), kill)
    timer.start()
    try:
        assert child.stdout is not None
        for line in child.stdout:
            text = line.strip()
            record = None
            if text.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(text)
            if isinstance(record, dict) and "config" in record:
                on_record(record)
            elif text:
                print(text, file=sys.stderr, flush=True)
        status = child.wait()
    finally:
        timer.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    return status, timed_out.is_set()


def parent_main(args: argparse.Namespace) -> int:
    started = time.perf_counter() - _process_age_s()  # --budget-s counts from the process start, imports included
    cuda = torch.cuda.is_available()  # no CUDA context here: the device is the children's alone
    if args.llava7b and not cuda:
        print("--llava7b needs a CUDA GPU (use --tiny on a CPU)", file=sys.stderr)
        return 2
    versions = _versions()
    want_trl = not args.no_trl
    if want_trl and (versions["trl"] is None or versions["datasets"] is None):
        print("trl/datasets are not installed: TRL is skipped (pip install -e '.[bench]')", file=sys.stderr)
        want_trl = False
    records: list[dict[str, Any]] = []
    matmul: list[float] = []

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")

    def on_record(record: dict[str, Any]) -> None:
        if record.get("config") == "matmul_peak" and record.get("bf16_tflops"):
            matmul.append(float(record["bf16_tflops"]))
        emit(record)

    def left_s() -> float:
        return args.budget_s - REPORT_RESERVE_S - (time.perf_counter() - started)

    children = 0
    for group in plan(args, want_trl, cuda):
        todo = list(group)
        while todo:
            left = left_s()
            if left < MIN_CHILD_S:
                for name in todo:
                    emit({"config": name, "skipped": "budget", "left_s": round(left, 1)})
                break
            reported: set[str] = set()

            def collect(record: dict[str, Any], seen: set[str] = reported) -> None:
                seen.add(record["config"])
                on_record(record)

            deadline_unix = time.time() + left
            timeout = left + CHILD_GRACE_S
            if args.child_timeout_s:
                timeout = min(timeout, args.child_timeout_s)
            children += 1
            child_start = time.perf_counter()
            status, timed_out = run_child(
                child_command(args, todo, deadline_unix, matmul[-1] if matmul else None), timeout, collect
            )
            progressed = any(name in reported for name in todo)
            todo = [name for name in todo if name not in reported]
            if not todo:
                break
            if status == 0 and not timed_out:
                for name in todo:  # a child that exits cleanly reports every name it was given
                    emit({"config": name, "error": "not reported by its child process"})
                break
            if status != CHILD_RESTART or not progressed:
                # It died or overran inside the first configuration it had not reported: that one failed.
                why = f"killed after {timeout:.0f} s" if timed_out else f"exit status {status}"
                emit(
                    {
                        "config": todo.pop(0),
                        "error": f"child process: {why}",
                        "seconds": round(time.perf_counter() - child_start, 1),
                    }
                )
            if todo:
                print(f"bench_train: a fresh child process for {len(todo)} configurations", file=sys.stderr)
    print(f"bench_train: {children} child processes", file=sys.stderr, flush=True)
    try:
        report(records, args, "cuda" if cuda else "cpu", started)
    except Exception as error:  # the JSON lines above are the results; a broken table must not hide them
        print(json.dumps({"config": "report", "error": f"{type(error).__name__}: {error}"[:500]}), flush=True)
        return 1
    return 0


# ---- one child: the named configurations, in this process -----------------------------------------------------

CHILD_RESTART = 3  # exit status: configurations are left, run them in a fresh process


def child_main(args: argparse.Namespace) -> int:
    names = [name for name in args.only.split(",") if name]
    workload: Workload = args.workload
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    processor, model_config = workload.processor_and_config()
    largest = max(size for _, size in (*workload.main_grid, *workload.trl_grid, *workload.trl_extra))
    n_pairs = max((args.warmup + args.steps + 1) * largest, args.ref_pairs, args.hardness_pairs, 2 * largest)
    data = build_data(workload, single_token_words(processor.tokenizer), n_pairs)
    run = Run(
        args=args,
        workload=workload,
        device=device,
        dtype=dtype,
        processor=processor,
        model_config=model_config,
        data=data,
        started=time.perf_counter() - _process_age_s(),
        matmul_tflops=args.matmul_tflops,
        deadline_unix=args.deadline_unix,
    )
    run.vision_tokens = vision_tokens(workload.image_size)
    fast = [f for f in ("packed", "two_rows") if f in args.forwards]
    ref_size = max(size for _, size in workload.main_grid)
    check_size = workload.main_grid[0][1]
    for index, name in enumerate(names):
        run_named(run, name, fast=fast, ref_size=ref_size, check_size=check_size)
        left = names[index + 1 :]
        if not left:
            break
        leaked = run.leaked_bytes() if cuda else 0
        if run.restart or leaked > LEAK_LIMIT:
            why = "ran out of memory" if run.restart else f"left {leaked / GIB:.2f} GiB allocated"
            print(f"bench_train: {name} {why}: the rest goes to a fresh process", file=sys.stderr, flush=True)
            return CHILD_RESTART
    return 0


def run_named(run: Run, name: str, *, fast: list[str], ref_size: int, check_size: int) -> None:
    """Run the configuration called ``name`` and print its line (a result, an error or ``skipped``)."""
    args, workload = run.args, run.workload
    if name == "env":
        cuda = run.device.type == "cuda"
        versions = _versions()
        run.emit(
            {
                "config": "env",
                "workload": workload.name,
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "dtype": str(run.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                **versions,
                "trl_included": not args.no_trl and versions["trl"] is not None and versions["datasets"] is not None,
                "budget_s": args.budget_s,
                "isolation": "child processes",
            }
        )
        return
    if name == "matmul_peak":
        try:
            run.matmul_tflops = measure_matmul_peak(run.device)
            run.emit({"config": "matmul_peak", "kind": "matmul", "bf16_tflops": round(run.matmul_tflops or 0.0, 1)})
        except Exception as error:
            run.emit({"config": "matmul_peak", "error": f"{type(error).__name__}: {error}"[:500]})
        free_device(run.device)
        return
    if name == "model":
        start = time.perf_counter()
        try:
            model = run.engine_model()
        except Exception as error:
            run.restart = True
            run.emit({"config": "model", "error": f"{type(error).__name__}: {error}"[:500]})
            return
        run.emit(
            {
                "config": "model",
                "lm_params": run.lm_params,
                "vision_params": run.vision_params,
                "attn_implementation": model.config.get_text_config()._attn_implementation,
                "lora_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "resident_gib": round(run.resident_bytes / GIB, 3),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        return
    parts = name.split("/")
    compiled = parts[-1] == "compiled"
    if compiled:
        parts = parts[:-1]
    if parts[0] == "engine" and len(parts) == 5:
        _, forward, method, gc_setting, batch = parts
        checkpointing, size = gc_setting == "gc_on", int(batch.removeprefix("b"))
        known = run.step_seconds.get((checkpointing, size))
        guess = (args.warmup + args.steps) * known * 1.5 + 2 if known else workload.guess_config_s
        run.attempt(name, guess, lambda: engine_step_config(run, forward, method, checkpointing, size, compiled))
    elif parts[0] == "reference" and len(parts) == 2:
        known = run.step_seconds.get((False, ref_size)) or run.step_seconds.get((True, ref_size))
        guess = (args.ref_pairs // ref_size + 1) * known if known else workload.guess_config_s
        run.attempt(name, guess, lambda: reference_config(run, parts[1], ref_size, compiled))
    elif name == "agreement":
        run.attempt(name, workload.guess_config_s, lambda: agreement_config(run, fast, check_size))
    elif name == "hardness":
        run.attempt(name, workload.guess_config_s, lambda: hardness_config(run))
    elif parts[0] == "trl" and len(parts) == 3:
        checkpointing, size = parts[1] == "gc_on", int(parts[2].removeprefix("b"))
        run.attempt(name, workload.guess_trl_s, lambda: trl_config(run, checkpointing, size))
    else:
        run.emit({"config": name, "error": "unknown configuration name"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every child runs with the same, deliberate thread count (the env line reports torch's own count).
    args.threads = apply_threads(args.threads)
    if args.only is not None:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
