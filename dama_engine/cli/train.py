"""``dama-train``: train from a YAML config, or ``--demo``: the proving ground, built on this machine.

    dama-train CONFIG.yaml [section.key=value ...]
    dama-train --demo --output-dir DIR [section.key=value ...]
    dama-train CONFIG.yaml --events EVENTS.jsonl   # progress records for a follower (dama_engine.events)

A progress bar shows step, loss, margin, accuracy and ETA; metrics go to ``OUTPUT/metrics.jsonl`` and a chart
to ``OUTPUT/adapter/training_curves.png``; the adapter to ``OUTPUT/adapter``. At the end: hallucination on the
generative set (CHAIR_i, CHAIR_s, coverage) base -> tuned, the held-out log-prob preference accuracy before ->
after, and the base-against-tuned table. Bad config values stop the run before any work, with a message naming
the field.

``--demo`` (:func:`dama_engine.proving.demo.prepare_proving_demo`) tunes the proving ground's seeing base (a tiny LLaVA
that names most shapes but calls orange ones red) on on-policy pairs of its own answers, and scores 200 held-out
scenes; the first run builds the base, pairs and scenes (1.5-3 min) under ``DAMA_PROVING_DIR``
(default ``~/.cache/dama/proving``), later runs reuse them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dama_engine.callbacks import Callback, CallbackList
from dama_engine.config import ConfigError, load_config
from dama_engine.events import EventLog

if TYPE_CHECKING:
    from dama_engine.training import TrainResult


# What the progress bar shows of a step, in this order, where the step reports it: each method its own metrics
# (sft: the loss is the NLL per answer token and there is no reward; dpo: a fixed beta; dama: the kept pairs too).
PROGRESS_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", ".4f"),
    ("reward_margin", "margin", ".3f"),
    ("reward_accuracy", "acc", ".2f"),
    ("beta_mean", "beta", ".3f"),
    ("kept", "kept", ".0f"),
    ("answer_tokens", "tokens", ".0f"),
)


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's fields for one step's ``metrics`` (those of :data:`PROGRESS_FIELDS` it carries)."""
    return {label: format(metrics[key], spec) for key, label, spec in PROGRESS_FIELDS if key in metrics}


class ProgressPrinter(Callback):
    """Stage lines and a tqdm bar for the training steps (``quiet``: nothing, for ranks other than 0)."""

    def __init__(self, stream: Any = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bar: Any = None
        self.stage_bar: Any = None

    def _close_stage_bar(self) -> None:
        if self.stage_bar is not None:
            self.stage_bar.close()
            self.stage_bar = None

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        self._close_stage_bar()
        if stage == "training":
            resumed = info.get("resumed_from_step", 0)
            self.bar = tqdm(
                total=info["steps"], initial=resumed, desc="training", unit="step", file=self.stream, dynamic_ncols=True
            )
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        details = ", ".join(f"{k}={v}" for k, v in info.items())
        print(f"[dama] {stage}" + (f" ({details})" if details else ""), file=self.stream, flush=True)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.stage_bar is not None and (self.stage_bar.total != total or done < self.stage_bar.n):
            self._close_stage_bar()  # a new pass of the same stage (e.g. the held-out split)
        if self.stage_bar is None:
            unit = "sample" if stage == "sampling" else "pair"  # the proving ground's sampling counts answers
            self.stage_bar = tqdm(total=total, desc=stage, unit=unit, file=self.stream, dynamic_ncols=True)
        self.stage_bar.n = done
        self.stage_bar.refresh()

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        if self.quiet:
            return
        if self.bar is None:
            return
        self.bar.set_postfix(progress_fields(metrics), refresh=False)
        self.bar.update(step - self.bar.n)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.quiet:
            return
        line = f"[dama] held-out @ step {step}"
        if "eval_logp_accuracy" in metrics:
            line = (
                f"[dama] held-out @ step {step}: log-prob accuracy {metrics['eval_logp_accuracy']:.3f}, "
                f"log-prob margin {metrics['eval_logp_margin']:.3f}"
            )
        if "eval_rewards_chosen" not in metrics:  # sft: no reference, the loss is the chosen answers' NLL
            line += f", loss {metrics['eval_loss']:.4f}"
        elif step > 0:  # before the first step the policy is the reference: no implicit reward yet
            line += (
                f"; implicit reward accuracy {metrics['eval_accuracy']:.3f}, "
                f"margin {metrics['eval_margin']:.4f}, loss {metrics['eval_loss']:.4f}"
            )
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self._close_stage_bar()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("config", nargs="?", help="YAML config file (see README: Configuration)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.learning_rate=1e-5")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="the proving ground: tune a tiny seeing LLaVA against its own hallucinations (built on first use)",
    )
    parser.add_argument("--output-dir", help="where to write the run (overrides run.output_dir)")
    parser.add_argument(
        "--events", help="append progress events as JSON lines here (rank 0; what a launcher like the worker follows)"
    )
    return parser


CHAIR_LINES = (
    ("CHAIR_i", "chair_i", "share of named objects that are not in the image"),
    ("CHAIR_s", "chair_s", "share of answers naming any object not in the image"),
    ("coverage", "coverage", "share of the image's objects named"),
)


def summary_lines(result: TrainResult) -> list[str]:
    """What a finished run prints: hallucination base -> tuned on the generative set, the held-out log-prob
    preference accuracy before -> after (the policy's own: chosen answer likelier; the implicit-reward accuracy is 0
    before training by construction), and the base-against-tuned table."""
    lines = []
    evaluation = result.evaluation or {}
    generative = evaluation.get("generative")
    if generative and generative.get("tuned"):
        base, tuned = generative["base"], generative["tuned"]
        lines.append(f"[dama] hallucination on {generative['samples']} held-out images, base -> tuned:")
        for name, key, meaning in CHAIR_LINES:
            lines.append(f"         {name:<9} {base[key]:.3f} -> {tuned[key]:.3f}   ({meaning})")
    before, after = result.eval_before or {}, result.eval_after or {}
    if "eval_logp_accuracy" in before and "eval_logp_accuracy" in after:
        lines.append(
            f"[dama] held-out log-prob preference accuracy ({int(after['eval_pairs'])} pairs, chosen answer "
            f"likelier): before {before['eval_logp_accuracy']:.3f} -> after {after['eval_logp_accuracy']:.3f} "
            f"(log-prob margin {before['eval_logp_margin']:.3f} -> {after['eval_logp_margin']:.3f})"
        )
    if evaluation:
        from dama_engine.evaluation import comparison_table

        lines.append(f"[dama] base against tuned:{'base':>28} {'tuned':>8}")
        for name, base_value, tuned_value in comparison_table(evaluation):
            base_text = "-" if base_value is None else f"{base_value:.3f}"
            tuned_text = "-" if tuned_value is None else f"{tuned_value:.3f}"
            lines.append(f"         {name:<28} {base_text:>8} {tuned_text:>8}")
    return lines


def train_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Under torchrun every rank runs this; only rank 0 prints and records events.
    is_main = os.environ.get("RANK", "0") == "0"
    events = EventLog(Path(args.events)) if args.events and is_main else None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show the stages; per-file loading bars are noise
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        if args.demo:
            if args.config:
                overrides.insert(0, args.config)  # with --demo every positional is an override
            from dama_engine.proving import default_root, prepare_proving_demo

            if is_main:
                print(
                    f"[dama] proving ground: {default_root()} (the first run builds the seeing base, its pairs and "
                    "held-out scenes, 1.5-3 min; later runs reuse them)",
                    file=sys.stderr,
                    flush=True,
                )
            config = prepare_proving_demo(Path(args.output_dir or "runs/demo"), overrides)
        elif args.config:
            config = load_config(args.config, overrides)
        else:
            _parser().error("give a CONFIG.yaml, or --demo")
    except ConfigError as error:
        print(f"dama-train: {error}", file=sys.stderr)
        if events is not None:
            events.error(str(error))
        return 2

    from dama_engine.data import DataError
    from dama_engine.training import train

    printer = ProgressPrinter(quiet=not is_main)
    callback = CallbackList([printer] if events is None else [printer, events])
    started = time.monotonic()
    try:
        result = train(config, callback)
    except (DataError, ConfigError) as error:  # ConfigError: what needs the process count (the filter group)
        printer.close()
        print(f"dama-train: {error}", file=sys.stderr)
        if events is not None:
            events.error(str(error), getattr(error, "errors", None))
        return 2
    finally:
        printer.close()
    if printer.quiet:
        return 0
    out = sys.stdout
    print(f"[dama] finished {result.steps}/{result.total_steps} steps in {time.monotonic() - started:.1f} s", file=out)
    for line in summary_lines(result):
        print(line, file=out)
    if result.adapter_dir:
        print(f"[dama] adapter: {result.adapter_dir}", file=out)
        print(f"[dama] metrics: {result.output_dir / 'metrics.jsonl'}", file=out)
        print(f"[dama] chart:   {result.adapter_dir / 'training_curves.png'}", file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(train_main())
