"""``dama-eval``: compare a base model with its tuned version on preference pairs and/or a generative eval set.

    dama-eval CONFIG.yaml [key=value | section.key=value ...]

A minimal config (fields: :class:`dama_engine.evaluation.EvaluationConfig`)::

    model: {name_or_path: runs/demo/model}
    adapter: runs/demo/adapter
    data:
      preference: runs/demo/data/eval.jsonl
      generative: runs/demo/data/generative_eval.jsonl
      vocabulary: runs/demo/data/vocabulary.json
    generation: {max_new_tokens: 64}
    output_dir: runs/demo/eval

Progress bars show each stage; the end prints a base-vs-tuned table. Files: ``OUTPUT/results.json``,
``OUTPUT/generations.jsonl``, ``OUTPUT/preference_pairs.jsonl``, ``OUTPUT/evaluation.png``. Bad config values or
data stop the run before any model is loaded, with a message naming the field or line (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, ClassVar, TextIO

from dama_engine.callbacks import Callback
from dama_engine.config import ConfigError


class EvalProgress(Callback):
    """A stage line per stage and a tqdm bar for the stages that report progress."""

    command = "dama-eval"
    units: ClassVar[dict[str, str]] = {
        "log_probs": "pair",
        "generating": "sample",
        "scoring": "pair",
    }  # stages with a bar

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self._stage_label = ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.close()
        details = ", ".join(f"{key}={value}" for key, value in info.items() if value is not None)
        print(f"[{self.command}] {stage}" + (f" ({details})" if details else ""), file=self.stream, flush=True)
        self._stage_label = f"{stage} ({info['model']})" if "model" in info else stage
        total = self.bar_total(info)
        if stage in self.units and total is not None:
            self._open_bar(stage, total)

    def bar_total(self, info: dict[str, Any]) -> int | None:
        """How many items the stage's bar counts, from its ``on_stage`` info (None: no bar yet)."""
        total = info.get("pairs", info.get("samples"))
        if isinstance(total, int) and isinstance(info.get("pope_questions"), int):
            total += info["pope_questions"]  # the generating pass also answers POPE's questions
        return total if isinstance(total, int) else None

    def _open_bar(self, stage: str, total: int) -> None:
        from tqdm import tqdm

        unit = self.units.get(stage, "item")
        self.bar = tqdm(total=total, desc=self._stage_label or stage, unit=unit, file=self.stream)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        if self.bar is None or self.bar.total != total:
            self.close()
            self._open_bar(stage, total)
        self.bar.update(done - self.bar.n)


def format_table(rows: list[tuple[str, float | None, float | None]]) -> str:
    """The base-vs-tuned table: one metric per line, with the change where both values exist."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    width = max([len("metric"), *(len(name) for name, _, _ in rows)])
    lines = [f"{'metric':<{width}}  {'base':>10}  {'tuned':>10}  {'change':>10}"]
    for name, base, tuned in rows:
        change = "-" if base is None or tuned is None else f"{tuned - base:+.4f}"
        lines.append(f"{name:<{width}}  {cell(base):>10}  {cell(tuned):>10}  {change:>10}")
    return "\n".join(lines)


def config_parser(prog: str, description: str | None, what: str, example: str) -> argparse.ArgumentParser:
    """The arguments of a command run from one YAML config: ``CONFIG.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", help=f"YAML {what} config")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    return parser


def eval_main(argv: list[str] | None = None) -> int:
    args = config_parser("dama-eval", __doc__, "evaluation", "generation.max_new_tokens=32").parse_args(argv)
    from dama_engine.data import DataError, DataFormatError
    from dama_engine.evaluation import comparison_table, load_evaluation_config, run_evaluation

    try:
        config = load_evaluation_config(args.config, list(args.overrides))
        if config.judge is not None and config.judge.api_key is None and os.environ.get("DAMA_JUDGE_API_KEY"):
            # The entry point reads the environment; the engine only takes the key it is given.
            config.judge.api_key = os.environ["DAMA_JUDGE_API_KEY"]
    except ConfigError as error:
        print(f"dama-eval: {error}", file=sys.stderr)
        return 2

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show the stages
    progress = EvalProgress()
    try:
        result = run_evaluation(config, progress)
    except (ConfigError, DataError, DataFormatError) as error:
        progress.close()
        print(f"dama-eval: {error}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    print(format_table(comparison_table(result.results)))
    print(f"[dama-eval] results: {result.results_path}")
    if result.generations_path:
        print(f"[dama-eval] answers: {result.generations_path}")
    if result.pairs_path:
        print(f"[dama-eval] pairs:   {result.pairs_path}")
    print(f"[dama-eval] chart:   {result.chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(eval_main())
