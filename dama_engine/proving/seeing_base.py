"""A tiny base that can see the shapes world, and hallucinates measurably: built once per seed, cached.

:func:`build_seeing_base` makes the base model the demo, the learning test and the study start from:

1. **Data**: ``scenes`` shapes-world scenes (:mod:`dama_engine.proving.shapes`, 32 px) in TRL's prompt/completion
   form, each completion the scene's canonical description, except for a **controlled share of hallucinated
   objects**: an ``orange`` object is described as ``red`` (its near colour on the colour circle) in
   ``CONFUSION_RATE`` of its mentions. Under greedy decoding the base names the majority label, so it hallucinates
   on orange objects (a sixth of all objects) and sees the rest.
2. **Model**: the tiny LLaVA at hidden size 128 (:func:`dama_engine.models.tiny.build_tiny_model`; about 1M parameters
   besides the embeddings, which the issue's probe found is what it takes to see at 32 px).
3. **Training**: ``method: sft`` through the engine's own trainer, a full fine-tune with the vision tower and the
   projector trained too (the random tower has to learn features), ``steps`` steps at batch 16, one thread.

The result is a plain checkpoint folder (``from_pretrained``), written to ``out_dir`` together with
``seeing_base.json`` (the recipe it was built with). A folder whose recipe matches is reused, as the demo's tiny
model is. CPU runs with one thread are deterministic: two builds with one seed give identical weights.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dama_engine.callbacks import Callback
from dama_engine.model_files import code_version, stamped, write_stamp
from dama_engine.proving.shapes import PROMPTS, describe_scene, draw_scene, sample_scene

HIDDEN_SIZE = 128
IMAGE_SIZE = 32
CONFUSIONS = {"orange": "red"}
CONFUSION_RATE = 0.7
RECIPE_FILE = "seeing_base.json"


def sft_rows(scenes: int, seed: int, out_dir: Path) -> Path:
    """Write ``scenes`` prompt/completion rows with the controlled confusions into ``out_dir``; the data file."""
    rng = random.Random(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    data_file = out_dir / "sft.jsonl"
    with data_file.open("w", encoding="utf-8") as handle:
        for index in range(scenes):
            scene = sample_scene(rng)
            image_name = f"images/sft_{index:05d}.png"
            draw_scene(scene, rng, IMAGE_SIZE).save(out_dir / image_name, format="PNG")
            said = [
                type(item)(CONFUSIONS[item.colour], item.shape, item.position)
                if item.colour in CONFUSIONS and rng.random() < CONFUSION_RATE
                else item
                for item in scene
            ]
            question = rng.choice(PROMPTS)
            record = {
                "id": f"sft-{index:05d}",
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "completion": [{"role": "assistant", "content": describe_scene(said)}],
                "images": [image_name],
                "objects": [item.name for item in scene],
            }
            handle.write(json.dumps(record) + "\n")
    return data_file


def seeing_base_recipe(seed: int, steps: int, scenes: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "steps": steps,
        "scenes": scenes,
        "hidden_size": HIDDEN_SIZE,
        "image_size": IMAGE_SIZE,
        "confusions": CONFUSIONS,
        "confusion_rate": CONFUSION_RATE,
        "code": code_version("seeing_base"),
    }


def build_seeing_base(
    out_dir: Path, *, seed: int = 0, steps: int = 600, scenes: int = 4000, callback: Callback | None = None
) -> Path:
    """Build (or reuse) the seeing base in ``out_dir``; returns ``out_dir``. ``callback`` follows the training
    (its stages and steps), e.g. to show a bar while the base builds."""
    from dama_engine.config import parse_config
    from dama_engine.models import build_tiny_model
    from dama_engine.threads import apply_threads
    from dama_engine.training import train

    out_dir = Path(out_dir)
    wanted = seeing_base_recipe(seed, steps, scenes)
    if stamped(out_dir, RECIPE_FILE, wanted, "config.json"):
        return out_dir
    apply_threads()
    with tempfile.TemporaryDirectory(prefix="dama-seeing-base-") as work_name:
        work = Path(work_name)
        data_file = sft_rows(scenes, seed, work / "data")
        corpus = [json.loads(line)["completion"][0]["content"] for line in data_file.read_text().splitlines()]
        build_tiny_model("llava", work / "init", seed=seed, corpus=[*PROMPTS, *corpus], hidden_size=HIDDEN_SIZE)
        config = parse_config(
            {
                "model": {"name_or_path": str(work / "init"), "precision": "fp32"},
                "data": {"train": str(data_file), "max_length": 256},
                "lora": {"enabled": False, "train_projector": True, "freeze_vision_tower": False},
                "objective": {"method": "sft"},
                "optim": {
                    "learning_rate": 1e-3,
                    "batch_size": 16,
                    "max_steps": steps,
                    "warmup_ratio": 0.05,
                    "seed": seed,
                },
                "evaluation": {"enabled": False},
                "run": {"output_dir": str(work / "run"), "resume": False, "log_every": 50},
            }
        )
        result = train(config, callback)
        assert result.adapter_dir is not None
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(result.adapter_dir, out_dir)
    write_stamp(out_dir, RECIPE_FILE, wanted)
    return out_dir
