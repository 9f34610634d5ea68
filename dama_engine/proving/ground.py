"""The proving ground's one recipe: the seeing base, its on-policy pairs, held-out scenes and the training settings
that the demo (``dama-train --demo``, ``scripts/dama.sh demo``), the learning regression test and the study share.

:func:`prepare_proving_ground` builds (once, cached under ``root``) what a run needs:

- ``base/``: the seeing base (:func:`dama_engine.proving.seeing_base.build_seeing_base`), a plain ``from_pretrained``
  folder that names most objects and calls orange objects red;
- ``pairs/``: on-policy preference pairs (:func:`dama_engine.proving.on_policy.on_policy_pairs`): the base's own sampled
  descriptions of training scenes, a faithful one preferred to a hallucinating one; ``train.jsonl`` and
  ``eval.jsonl`` (held-out pairs), each row with its oracle hardness;
- ``scenes/``: held-out scenes for CHAIR (``generative_eval.jsonl`` + ``vocabulary.json``), drawn with their own
  seed: new images, not new layouts. The world is small (96 one-object layouts of 6 colours x 4
  shapes x 4 cells), so most layouts also occur among the base's training scenes and the pairs' scenes, with other
  position and size jitter; CHAIR here measures what the model says about new images of a known world.

Each part is rebuilt when its recipe or the code that makes it changes (``proving.json`` records both).
:data:`TRAINING` holds the preference stage's settings, chosen on this project's 2-core CPU machine with seed-0
runs (200 held-out scenes; base CHAIR_i 0.285) before the study compared the methods:

- ``beta`` 2.0, far above the paper's 0.1: the tiny base is very sure of its words, and at 0.1 the DPO family
  lowers the rejected colour word by moving its probability onto unrelated tokens ("A Describe left."), so the
  model stops naming objects (dpo, 100 steps: CHAIR_i 0.34, coverage 0.71 -> 0.50). At 2.0 the loss saturates
  once a pair is separated by a few nats, and dpo lowers CHAIR_i to 0.17-0.19 (seeds 0-2, 200 steps).
- ``filter_sigma`` 5.0 instead of the released code's 1: at beta 2 the reward gaps spread over several nats, and
  a Gaussian of width 1 keeps only pairs near the running mean; dama then suppresses "red" without learning
  "orange" (it says "yellow" for orange objects) and CHAIR_i rises to 0.30-0.39 (our reading: the pairs that
  correct the base's systematic error are among those dropped; not measured pair by pair).
  keep_ratio 1 (no filtering) gives 0.185, width 3 0.213, width 5 0.21-0.23 (seeds 0-2, 200 steps).
- 300 steps at lr 3e-4 (dama, seed 0: CHAIR_i 0.189, coverage 0.80).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dama_engine.callbacks import Callback
from dama_engine.model_files import code_version, stamped, write_stamp

# The seeing base (dama_engine.proving.seeing_base's defaults), its pairs and the held-out scenes.
BASE: dict[str, Any] = {"seed": 0, "steps": 600, "scenes": 4000}
PAIRS: dict[str, Any] = {"scenes": 1600, "samples": 8, "temperature": 0.7, "seed": 11}
SCENES: dict[str, Any] = {"count": 300, "seed": 7}
# The preference stage: LoRA (projector trained too), batch 16.
TRAINING: dict[str, Any] = {
    "method": "dama",
    "beta": 2.0,
    "filter_sigma": 5.0,
    "learning_rate": 3e-4,
    "steps": 300,
    "batch_size": 16,
    "lora_r": 16,
    "lora_alpha": 32,
}
IMAGE_SIZE = 32
STAMP = "proving.json"


@dataclass(frozen=True)
class ProvingGround:
    """Where the proving ground's parts are."""

    root: Path
    base: Path
    pairs: Path
    scenes: Path

    @property
    def train(self) -> Path:
        return self.pairs / "train.jsonl"

    @property
    def eval(self) -> Path:
        return self.pairs / "eval.jsonl"

    @property
    def generative(self) -> Path:
        return self.scenes / "generative_eval.jsonl"

    @property
    def vocabulary(self) -> Path:
        return self.scenes / "vocabulary.json"


def default_root() -> Path:
    """``DAMA_PROVING_DIR``, else ``~/.cache/dama/proving``."""
    return Path(os.environ.get("DAMA_PROVING_DIR") or Path.home() / ".cache" / "dama" / "proving").expanduser()


def ground_at(root: Path | None = None) -> ProvingGround:
    """Where the proving ground's parts are (or will be) under ``root`` (default :func:`default_root`); builds
    nothing (:func:`prepare_proving_ground` does)."""
    root = Path(root) if root is not None else default_root()
    return ProvingGround(root=root, base=root / "base", pairs=root / "pairs", scenes=root / "scenes")


def prepare_proving_ground(
    root: Path | None = None, *, scenes: int | None = None, callback: Callback | None = None
) -> ProvingGround:
    """Build (or reuse) the seeing base, its on-policy pairs and ``scenes`` held-out scenes under ``root``.
    ``callback`` follows the building (the base's training steps, then the sampling of its pairs)."""
    from dama_engine.proving.on_policy import on_policy_pairs
    from dama_engine.proving.seeing_base import build_seeing_base
    from dama_engine.proving.shapes import make_demo_dataset
    from dama_engine.threads import apply_threads

    apply_threads()
    ground = ground_at(root)
    build_seeing_base(ground.base, **BASE, callback=callback)
    base_recipe = json.loads((ground.base / "seeing_base.json").read_text())

    wanted_pairs = {**PAIRS, "image_size": IMAGE_SIZE, "base": base_recipe, "code": code_version("proving_pairs")}
    if not stamped(ground.pairs, STAMP, wanted_pairs, "train.jsonl"):
        shutil.rmtree(ground.pairs, ignore_errors=True)
        on_policy_pairs(
            ground.base,
            ground.pairs,
            scenes=PAIRS["scenes"],
            seed=PAIRS["seed"],
            samples=PAIRS["samples"],
            temperature=PAIRS["temperature"],
            image_size=IMAGE_SIZE,
            callback=callback,
        )
        write_stamp(ground.pairs, STAMP, wanted_pairs)

    count = scenes or SCENES["count"]
    wanted_scenes = {"count": count, "seed": SCENES["seed"], "image_size": IMAGE_SIZE, "code": code_version("scenes")}
    if not stamped(ground.scenes, STAMP, wanted_scenes, "generative_eval.jsonl"):
        shutil.rmtree(ground.scenes, ignore_errors=True)
        make_demo_dataset(
            ground.scenes, n_train=0, n_eval=0, n_generative=count, image_size=IMAGE_SIZE, seed=SCENES["seed"]
        )
        write_stamp(ground.scenes, STAMP, wanted_scenes)
    return ground


SYNTHETIC = {"train": 1600, "eval": 300, "seed": 3}


def synthetic_pairs(ground: ProvingGround) -> Path:
    """The shapes world's swap pairs (:func:`dama_engine.proving.shapes.make_demo_dataset`, oracle hardness) at the
    proving ground's image size, built once under ``ground.root / "synthetic"`` and rebuilt when their recipe or
    code changes; the folder holding ``train.jsonl`` and ``eval.jsonl``."""
    from dama_engine.proving.shapes import make_demo_dataset

    folder = ground.root / "synthetic"
    wanted = {**SYNTHETIC, "image_size": IMAGE_SIZE, "code": code_version("scenes")}
    if not stamped(folder, STAMP, wanted, "eval.jsonl"):
        shutil.rmtree(folder, ignore_errors=True)
        make_demo_dataset(
            folder,
            n_train=SYNTHETIC["train"],
            n_eval=SYNTHETIC["eval"],
            n_generative=0,
            image_size=IMAGE_SIZE,
            seed=SYNTHETIC["seed"],
            with_hardness=True,
        )
        write_stamp(folder, STAMP, wanted)
    return folder


def training_values(ground: ProvingGround, output_dir: Path, *, scenes: int = 200, seed: int = 0) -> dict[str, Any]:
    """The engine config (a dict, so ``key=value`` overrides apply on top) of the proving ground's preference stage:
    the base, the pairs, :data:`TRAINING`, and an after-training evaluation on ``scenes`` held-out scenes."""
    return {
        "model": {"name_or_path": str(ground.base), "precision": "fp32"},
        "data": {"train": str(ground.train), "eval": str(ground.eval), "max_length": 256},
        "lora": {
            "r": TRAINING["lora_r"],
            "alpha": TRAINING["lora_alpha"],
            "dropout": 0.0,
            "train_projector": True,
        },
        "objective": {
            "method": TRAINING["method"],
            "beta": TRAINING["beta"],
            "filter_sigma": TRAINING["filter_sigma"],
        },
        "optim": {
            "learning_rate": TRAINING["learning_rate"],
            "batch_size": TRAINING["batch_size"],
            "max_steps": TRAINING["steps"],
            "warmup_ratio": 0.1,
            "seed": seed,
        },
        "evaluation": {
            "generative": str(ground.generative),
            "vocabulary": str(ground.vocabulary),
            "max_samples": scenes,
            "max_new_tokens": 40,
            # The seeing base was never taught yes/no questions, so POPE would measure nothing here yet (and would
            # multiply the evaluation's generation calls); issue 22 teaches the base to answer them.
            "pope": False,
        },
        "run": {"output_dir": str(output_dir), "resume": False, "log_every": 10},
    }
