"""``dama-pairs``: preference pairs sampled from a model and judged against what is in each image.

    dama-pairs CONFIG.yaml [key=value | section.key=value ...]

A minimal config (fields: :class:`dama_engine.pairs.PairsConfig`)::

    model: {name_or_path: runs/demo/model}          # model.init_adapter: sample base + that adapter
    data:
      generative: runs/demo/data/generative_eval.jsonl
      vocabulary: runs/demo/data/vocabulary.json
    generation: {temperature: 1.0, max_new_tokens: 64, seed: 0}
    sampling: {samples_per_prompt: 8, prompts_per_batch: 4}
    output_dir: runs/demo/pairs

For a prompt set (image and prompt, no objects), name a judge that lists each image's objects (any OpenAI-compatible
chat endpoint; its key from ``DAMA_JUDGE_API_KEY`` when ``judge.api_key`` is unset)::

    judge: {url: https://judge.example/v1, model: my-vlm, prompt: "List the objects you see, comma-separated."}

A progress bar counts prompts (and images while the judge lists objects); the end prints the report's counts.
Files: ``OUTPUT/dataset/`` (the preference dataset, TRL format: ``dama-train data.train=OUTPUT/dataset``),
``OUTPUT/samples.jsonl``, ``OUTPUT/report.json``, ``OUTPUT/report.png``. Bad config values or data, a judge that
answers for no image, and a run where no prompt yields a pair, stop with a message saying what to change (exit
status 2).
"""

from __future__ import annotations

import os
import sys
from typing import Any, ClassVar

from dama_engine.cli.eval import EvalProgress, config_parser
from dama_engine.errors import UserError


class PairsProgress(EvalProgress):
    """A line per stage and a tqdm bar over the prompts while generating."""

    command = "dama-pairs"
    units: ClassVar[dict[str, str]] = {"generating": "prompt", "listing_objects": "image"}

    def bar_total(self, info: dict[str, Any]) -> int | None:
        return info.get("images", info.get("prompts"))


def pairs_main(argv: list[str] | None = None) -> int:
    parser = config_parser("dama-pairs", __doc__, "pair generation", "sampling.samples_per_prompt=16")
    args = parser.parse_args(argv)
    from dama_engine.pairs import generate_pairs, load_pairs_config

    progress = PairsProgress()
    try:
        config = load_pairs_config(args.config, list(args.overrides))
        if config.judge is not None and config.judge.api_key is None and os.environ.get("DAMA_JUDGE_API_KEY"):
            config.judge.api_key = os.environ["DAMA_JUDGE_API_KEY"]  # the entry point reads the environment
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bar shows the prompts
        result = generate_pairs(config, progress)
    except UserError as error:
        progress.close()
        print(f"dama-pairs: {error}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    report, output = result.report, result.output
    assert output is not None  # nothing asks this run to stop
    print(
        f"[dama-pairs] {report['pairs']} pairs from {report['prompts_tried']} prompts ({report['samples']} samples: "
        f"{report['faithful_samples']} faithful, {report['hallucinating_samples']} hallucinating; "
        f"{report['samples_per_second']} samples/s)"
    )
    print(f"[dama-pairs] dataset: {output.dataset_dir}")
    print(f"[dama-pairs] samples: {output.samples_path}")
    print(f"[dama-pairs] report:  {output.report_path}")
    print(f"[dama-pairs] chart:   {output.chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(pairs_main())
