"""``dama models build NAME --output DIR`` (``python -m worker.build_model``): build a built-in base model
(``dama/tiny-llava``, ``dama/tiny-seeing-llava``, ...) into a folder on this machine, the weights the service's
workers build, so an adapter downloaded from a job loads with peft on it::

    base = AutoModelForImageTextToText.from_pretrained(DIR)
    model = PeftModel.from_pretrained(base, "adapters/job_...-adapter")

An adapter's ``base_model_name_or_path`` names the built-in model (``dama/tiny-llava``), which no hub serves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dama_engine.config import ConfigError
from jobstore.spec import BUILTIN_MODELS
from worker.engine_config import build_builtin_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dama models build", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"a built-in model: {', '.join(BUILTIN_MODELS)}")
    parser.add_argument("--output", required=True, type=Path, help="the folder to build it in (created)")
    args = parser.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        print(f"error: {args.output} is not empty; give a new folder", file=sys.stderr)
        return 2
    try:
        build_builtin_model(args.name, args.output)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
