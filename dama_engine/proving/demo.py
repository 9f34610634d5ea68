"""The demo runs, everything built on this machine, nothing downloaded.

``dama-train --demo --output-dir DIR`` calls :func:`prepare_proving_demo`: the proving ground's preference stage
(:mod:`dama_engine.proving`: a tiny LLaVA "seeing base" that names most objects of the shapes world but calls orange
objects red, trained on on-policy pairs of its own answers), with held-out evaluations during training and
hallucination (CHAIR) on 200 held-out scenes, base against tuned, after it. The proving ground is built once
(1.5-3 min on 2 CPU cores) under ``DAMA_PROVING_DIR`` (default ``~/.cache/dama/proving``) and reused.

:func:`prepare_demo` builds (once) ``DIR/model`` and ``DIR/data``: a tiny LLaVA-shaped model with random weights
and synthetic pairs; a quick run to exercise the engine (the tests train it). Both models load through
``from_pretrained`` exactly as a real checkpoint does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dama_engine.config import TrainConfig, apply_overrides, parse_config
from dama_engine.models import build_tiny_model
from dama_engine.proving.shapes import make_demo_dataset
from dama_engine.threads import apply_threads

DEMO_FAMILY = "llava"
DEMO_SCENES = 200  # held-out scenes scored for CHAIR after a proving-ground demo
DEMO_EVALUATIONS = 8  # held-out evaluations during a proving-ground demo (each eval_every = steps / 8)


def prepare_proving_demo(
    output_dir: Path, overrides: list[str] | None = None, *, root: Path | None = None
) -> TrainConfig:
    """The proving ground's preference stage (:func:`dama_engine.proving.training_values` with ``overrides``),
    evaluated on the held-out pairs :data:`DEMO_EVALUATIONS` times during training (unless ``run.eval_every`` is
    given) and on :data:`DEMO_SCENES` held-out scenes after it. The config is checked before the proving ground
    under ``root`` (default :func:`dama_engine.proving.default_root`) is built or reused."""
    from dama_engine.proving.ground import ground_at, prepare_proving_ground, training_values
    from dama_engine.training import check_filter_group

    ground = ground_at(root)
    overrides = list(overrides or [])
    values = training_values(ground, Path(output_dir), scenes=DEMO_SCENES)
    config = parse_config(apply_overrides(values, overrides))
    steps = config.optim.max_steps
    if steps and not any(item.partition("=")[0].strip() == "run.eval_every" for item in overrides):
        config.run.eval_every = max(1, steps // DEMO_EVALUATIONS)
    check_filter_group(config, int(os.environ.get("WORLD_SIZE", "1")))  # before minutes of building
    prepare_proving_ground(ground.root)
    return config


def demo_settings(output_dir: Path, model_dir: Path, data_dir: Path) -> dict[str, object]:
    """The demo's config values (a dict, so ``key=value`` overrides apply on top)."""
    return {
        "model": {"name_or_path": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_length": 256},
        # The projector is trained too: the tiny model's random vision features need a learned mapping.
        "lora": {"r": 32, "alpha": 32, "dropout": 0.0, "train_projector": True},
        "objective": {"method": "dama"},
        "optim": {
            # A randomly initialised tiny model needs a far larger step than a pretrained 7B (see README).
            "learning_rate": 1e-2,
            "batch_size": 16,
            "epochs": 4,
            "warmup_ratio": 0.1,
            "seed": 0,
        },
        "evaluation": {
            "generative": str(data_dir / "generative_eval.jsonl"),
            "vocabulary": str(data_dir / "vocabulary.json"),
            "max_samples": 32,
            "max_new_tokens": 24,
        },
        "run": {"output_dir": str(output_dir), "eval_every": 50, "checkpoint_every": 100},
    }


def prepare_demo(
    output_dir: Path, overrides: list[str] | None = None, *, n_train: int = 1600, n_eval: int = 200
) -> TrainConfig:
    """Build the demo model and data under ``output_dir`` (reused when present) and return its config."""
    apply_threads()  # building the tiny model is torch work too: the deliberate thread count from the start
    output_dir = Path(output_dir)
    model_dir, data_dir = output_dir / "model", output_dir / "data"
    if not (data_dir / "train.jsonl").is_file():
        # The demo rows carry a per-pair hardness from how the rejected answer was corrupted (DAMA.md 1.5), so
        # the data-aware factor runs without a CLIP scorer.
        make_demo_dataset(data_dir, n_train=n_train, n_eval=n_eval, seed=0, with_hardness=True)
    if not (model_dir / "config.json").is_file():
        build_tiny_model(DEMO_FAMILY, model_dir, seed=0, corpus=demo_corpus(data_dir / "train.jsonl"))
    base = parse_config(demo_settings(output_dir, model_dir, data_dir)).model_dump()
    return parse_config(apply_overrides(base, list(overrides or [])))


def demo_corpus(train_file: Path) -> list[str]:
    """Prompts and answers of the demo data: the tiny tokenizer learns their words as single tokens."""
    texts = []
    for line in train_file.read_text().splitlines():
        record = json.loads(line)
        texts += [part.get("text", "") for part in record["prompt"][0]["content"]]
        texts += [record["chosen"][0]["content"], record["rejected"][0]["content"]]
    return texts
