"""On-policy preference pairs from the shapes world: the base's own sampled descriptions, labelled against the
ground truth, a faithful one preferred to a hallucinating one (as RLAIF-V builds its pairs).

For each training scene the base samples ``samples`` descriptions (temperature ``temperature``); each is judged
with CHAIR (:func:`dama_engine.data.matcher.judge_response`) against the scene's true objects. A scene makes a pair when
at least one sample names no absent object (the chosen one: the faithful sample that covers most objects) and at
least one names an absent object (the rejected one: the first such sample). Each pair's hardness is the oracle's
(:func:`dama_engine.proving.shapes.oracle_logit`, the same fixed constants) through :func:`joint_softmax` over the two
answers' object phrases; a phrase about an empty cell scores 0.
"""

from __future__ import annotations

import json
import random
import re
from functools import partial
from pathlib import Path
from typing import Any

from dama_engine.callbacks import Callback
from dama_engine.proving.shapes import (
    COLOURS,
    ORACLE_SCALE,
    POSITIONS,
    PROMPTS,
    VOCABULARY,
    SceneObject,
    draw_scene,
    oracle_logit,
    sample_scene,
)

_PHRASE = re.compile(r"\ban? (\w+) (\w+) at the (top left|top right|bottom left|bottom right)\b", re.IGNORECASE)


def said_objects(text: str) -> list[SceneObject]:
    """The (colour, shape, position) phrases of a description in the canonical form."""
    return [SceneObject(c.lower(), s.lower(), p.lower()) for c, s, p in _PHRASE.findall(text)]


def text_hardness(scene: list[SceneObject], chosen: str, rejected: str) -> float:
    """delta_i of a pair of free descriptions: the oracle's logits per phrase through joint_softmax."""
    import torch

    from dama_engine.objective import flat_index, joint_softmax

    at = {item.position: item for item in scene}

    def logit(said: SceneObject) -> float:
        truth = at.get(said.position)
        if truth is None:
            return 0.0
        if said.colour not in COLOURS:  # a sampled non-word: no colour credit, the shape's as usual
            return oracle_logit(truth, SceneObject(truth.colour, said.shape, said.position)) - ORACLE_SCALE * 0.5
        return oracle_logit(truth, said)

    def logits(text: str) -> list[float]:
        return [logit(said) for said in said_objects(text)]

    first, second = logits(chosen), logits(rejected)
    pair_index, is_chosen = flat_index([len(first)], [len(second)])
    if not first and not second:
        return 0.0
    return float(joint_softmax(torch.tensor(first + second), pair_index, is_chosen, 1)[0])


def on_policy_pairs(
    base_dir: Path,
    out_dir: Path,
    *,
    scenes: int,
    seed: int,
    samples: int = 4,
    temperature: float = 1.0,
    image_size: int = 32,
    eval_share: float = 0.15,
    callback: Callback | None = None,
) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of on-policy pairs into ``out_dir``; return counts. ``callback``
    gets the stage ``sampling`` and its progress over the samples."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dama_engine.data import judge_response
    from dama_engine.forward import GenerationRequest, GenerationSettings, generate

    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    drawn = []
    for index in range(scenes):
        scene = sample_scene(rng)
        name = f"images/policy_{index:05d}.png"
        image = draw_scene(scene, rng, image_size)
        image.save(out_dir / name, format="PNG")
        drawn.append((scene, name, image, rng.choice(PROMPTS)))
    model = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    processor = AutoProcessor.from_pretrained(base_dir)
    requests = [GenerationRequest.from_prompt(prompt, [image]) for _, _, image, prompt in drawn for _ in range(samples)]
    settings = GenerationSettings(max_new_tokens=40, temperature=temperature, seed=seed)
    progress = None
    if callback is not None:
        callback.on_stage("sampling", {"samples": len(requests)})
        progress = partial(callback.on_progress, "sampling")
    answers = generate(model, processor, requests, settings, batch_size=32, progress=progress)
    rows = []
    for index, (scene, name, _, prompt) in enumerate(drawn):
        objects = [item.name for item in scene]
        judged = [
            judge_response(text, objects, VOCABULARY) for text in answers[index * samples : (index + 1) * samples]
        ]
        faithful = [j for j in judged if not j.hallucinated and j.mentioned]
        wrong = [j for j in judged if j.hallucinated]
        if not faithful or not wrong:
            continue
        chosen = max(faithful, key=lambda j: len(j.covered)).response
        rejected = wrong[0].response
        if chosen.strip() == rejected.strip():
            continue
        rows.append(
            {
                "id": f"policy-{index:05d}",
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "images": [name],
                "objects": objects,
                "scene": [item.to_dict() for item in scene],
                "bucket": "on_policy",
                "hardness": round(text_hardness(scene, chosen, rejected), 6),
            }
        )
    held = max(1, int(len(rows) * eval_share))
    for split, part in (("eval", rows[:held]), ("train", rows[held:])):
        with (out_dir / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps(row) + "\n")
    return {"scenes": scenes, "pairs": len(rows), "train": len(rows) - held, "eval": held, "positions": len(POSITIONS)}
