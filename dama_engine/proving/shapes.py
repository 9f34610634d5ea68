"""Shapes world v2: the demo's deterministic synthetic world, with ground truth for every scene.

A **scene** is 1-3 objects on a white background, each a (colour, shape, position) with distinct colours and
distinct shapes, in distinct cells of a 2x2 grid (``top left``, ``top right``, ``bottom left``,
``bottom right``). Its **canonical description** lists the objects in reading order:
"A red circle at the top left and a blue square at the bottom right."

A **preference pair** is the canonical description (chosen) against the same sentence with ``wrong`` of its
objects changed by a **swap** (rejected): only colour or shape words change, each to a value absent from the
scene, so both answers have the same words in the same places and the same length: no length or structure cue.
Difficulty is graded by two things, written on each row:

- ``wrong``: how many objects are wrong (1-3; more wrong objects is easier to tell apart),
- ``swap``: ``far_colour`` (a colour two or three steps away on the colour circle red-orange-yellow-green-
  blue-purple), ``near_colour`` (an adjacent colour: hardest) or ``shape``.

``bucket`` is ``"{wrong}x{swap}"``. Each row's ``hardness`` (with ``with_hardness=True``) is DAMA's delta_i
(shared/DAMA.md section 1.2) computed by the project's own :func:`dama_engine.objective.hardness.joint_softmax` from an
**oracle scorer** over the answers' object phrases (the sub-sentences), whose constants are fixed here, before any
method is compared: a phrase's logit is ``ORACLE_SCALE * (0.5 * colour_similarity + 0.5 * shape_match)`` with
``colour_similarity = 1 - circle_steps / 3`` against the true object at the phrase's position. It plays CLIP's
part on a world CLIP was not trained on, and grades near colours harder than far ones and one wrong object harder
than three. :func:`dama_engine.proving.blank_check.text_only_check` validates that the text alone carries no cue.

Written files (same seed: byte-identical):
    train.jsonl, eval.jsonl     TRL conversational preference rows, images by relative path, columns
                                ``id, prompt, chosen, rejected, images, objects, scene, wrong, swap, bucket``
                                (+ ``hardness``)
    generative_eval.jsonl       ``id, image, prompt, objects, scene`` (true object names, e.g. "red circle")
    vocabulary.json             ``{"objects": {shape: synonyms}, "colours": {colour: synonyms}}`` for CHAIR
    images/{train,eval,gen}_NNNNN.png
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from itertools import combinations, permutations, product
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# In colour-circle order: neighbours are "near" colours (DAMA's hard pairs), the circle closes purple -> red.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (240, 210, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle", "star")
VOCABULARY: dict[str, dict[str, list[str]]] = {
    "objects": {
        "circle": ["circle", "disc", "disk", "ring", "dot", "ball"],
        "square": ["square", "box", "block", "rectangle", "cube"],
        "triangle": ["triangle", "pyramid", "wedge"],
        "star": ["star", "pentagram"],
    },
    "colours": {
        "red": ["red", "crimson", "scarlet"],
        "orange": ["orange", "amber"],
        "green": ["green", "lime"],
        "blue": ["blue", "navy", "azure"],
        "yellow": ["yellow", "gold", "golden"],
        "purple": ["purple", "violet", "magenta"],
    },
}
PROMPTS = (
    "Describe the image.",
    "What is in this picture?",
    "What shapes do you see?",
    "Describe the shapes in the image.",
)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # the 2x2 grid's cells, reading order
SWAPS = ("far_colour", "near_colour", "shape")
MAX_OBJECTS = 3
MAX_WRONG = 3
# The oracle scorer's constants (fixed before any method was compared; see the module docstring).
ORACLE_SCALE = 5.0
ORACLE_COLOUR_WEIGHT = 0.5
BACKGROUND = (255, 255, 255)

DemoObject = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    position: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def to_dict(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}


@dataclass(frozen=True)
class DemoDataset:
    """Where :func:`make_demo_dataset` wrote what, and how much."""

    root: Path
    train: Path
    eval: Path
    generative_eval: Path
    vocabulary: Path
    images_dir: Path
    n_train: int
    n_eval: int
    n_generative: int
    bucket_counts: dict[str, int] = field(default_factory=dict)  # in the train split


def make_demo_dataset(
    out_dir: str | Path,
    *,
    n_train: int = 512,
    n_eval: int = 64,
    n_generative: int = 64,
    seed: int = 0,
    image_size: int = 64,
    with_hardness: bool = False,
) -> DemoDataset:
    """Write the demo dataset into ``out_dir`` (created if missing) and return where everything is."""
    if min(n_train, n_eval, n_generative) < 0:
        raise ValueError("make_demo_dataset: counts must be >= 0")
    if image_size < 32:
        raise ValueError(f"make_demo_dataset: image_size must be at least 32 pixels, got {image_size}")
    root = Path(out_dir)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    splits: dict[str, list[dict[str, Any]]] = {}
    for split, size in (("train", n_train), ("eval", n_eval)):
        rows = []
        for index in range(size):
            # Buckets in turn, so each holds an equal share of the split.
            wrong, swap = BUCKETS[index % len(BUCKETS)]
            scene, rejected_scene = sample_pair(rng, wrong, swap)
            image_name = f"images/{split}_{index:05d}.png"
            draw_scene(scene, rng, image_size).save(root / image_name, format="PNG")
            row: dict[str, Any] = {
                "id": f"{split}-{index:05d}",
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rng.choice(PROMPTS)}]}
                ],
                "chosen": [{"role": "assistant", "content": describe_scene(scene)}],
                "rejected": [{"role": "assistant", "content": describe_scene(rejected_scene)}],
                "images": [image_name],
                "objects": [item.name for item in scene],
                "scene": [item.to_dict() for item in scene],
                "wrong": wrong,
                "swap": swap,
                "bucket": f"{wrong}x{swap}",
            }
            if with_hardness:
                row["hardness"] = round(oracle_hardness(scene, rejected_scene), 6)
            rows.append(row)
        splits[split] = rows

    generative = []
    for index in range(n_generative):
        scene = sample_scene(rng)
        image_name = f"images/gen_{index:05d}.png"
        draw_scene(scene, rng, image_size).save(root / image_name, format="PNG")
        generative.append(
            {
                "id": f"gen-{index:05d}",
                "image": image_name,
                "prompt": rng.choice(PROMPTS),
                "objects": [item.name for item in scene],
                "scene": [item.to_dict() for item in scene],
            }
        )

    paths = {name: root / f"{name}.jsonl" for name in ("train", "eval", "generative_eval")}
    _write_jsonl(paths["train"], splits["train"])
    _write_jsonl(paths["eval"], splits["eval"])
    _write_jsonl(paths["generative_eval"], generative)
    vocabulary = root / "vocabulary.json"
    vocabulary.write_text(json.dumps(VOCABULARY, indent=2) + "\n", encoding="utf-8")
    return DemoDataset(
        root=root,
        train=paths["train"],
        eval=paths["eval"],
        generative_eval=paths["generative_eval"],
        vocabulary=vocabulary,
        images_dir=images_dir,
        n_train=n_train,
        n_eval=n_eval,
        n_generative=n_generative,
        bucket_counts=dict(sorted(Counter(row["bucket"] for row in splits["train"]).items())),
    )


def object_name(item: DemoObject) -> str:
    return f"{item[0]} {item[1]}"


def describe_scene(scene: list[SceneObject]) -> str:
    """The canonical description: ``"A red circle at the top left and a blue square at the bottom right."``"""
    names = [f"a {item.name} at the {item.position}" for item in scene]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed[0].upper()}{listed[1:]}."


def sample_scene(rng: random.Random) -> list[SceneObject]:
    """1 to ``MAX_OBJECTS`` objects with distinct colours, shapes and cells, in reading order of their cells."""
    count = rng.randint(1, MAX_OBJECTS)
    colours, shapes = rng.sample(list(COLOURS), count), rng.sample(SHAPES, count)
    cells = sorted(rng.sample(range(len(POSITIONS)), count))
    return [SceneObject(c, s, POSITIONS[cell]) for c, s, cell in zip(colours, shapes, cells, strict=True)]


def colour_steps(first: str, second: str) -> int:
    """Distance of two colours on the colour circle (0-3)."""
    names = list(COLOURS)
    gap = abs(names.index(first) - names.index(second))
    return min(gap, len(names) - gap)


def _swap_choices(scene: list[SceneObject], item: SceneObject, swap: str) -> list[str]:
    """Values absent from the scene that a ``swap`` of ``item`` may take."""
    if swap == "shape":
        return [shape for shape in SHAPES if shape not in {o.shape for o in scene}]
    absent = [colour for colour in COLOURS if colour not in {o.colour for o in scene}]
    near = swap == "near_colour"
    return [colour for colour in absent if (colour_steps(colour, item.colour) == 1) == near]


BUCKETS: tuple[tuple[int, str], ...] = tuple(
    (wrong, swap) for wrong in range(1, MAX_WRONG + 1) for swap in SWAPS if not (swap == "shape" and wrong == 3)
)  # three shape swaps would need six shapes; every other bucket occurs


def swapped_scenes(scene: list[SceneObject], wrong: int, swap: str) -> list[list[SceneObject]]:
    """Every rejected scene of bucket (``wrong``, ``swap``): ``wrong`` objects' colour (or shape) changed to
    distinct values absent from the scene (near colours: adjacent on the circle; far: not)."""
    results = []
    for indices in combinations(range(len(scene)), wrong):
        options = [_swap_choices(scene, scene[index], swap) for index in indices]
        for values in product(*options):
            if len(set(values)) < len(values):
                continue
            changed = list(scene)
            for index, value in zip(indices, values, strict=True):
                item = scene[index]
                changed[index] = (
                    SceneObject(item.colour, value, item.position)
                    if swap == "shape"
                    else SceneObject(value, item.shape, item.position)
                )
            results.append(changed)
    return results


@cache
def _most_swaps(wrong: int, swap: str) -> int:
    """The largest number of rejected scenes any scene has in this bucket (positions do not matter)."""
    most = 0
    for count in range(wrong, MAX_OBJECTS + 1):
        for colours in permutations(COLOURS, count):
            for shapes in permutations(SHAPES, count):
                scene = [SceneObject(c, s, POSITIONS[i]) for i, (c, s) in enumerate(zip(colours, shapes, strict=True))]
                most = max(most, len(swapped_scenes(scene, wrong, swap)))
    return most


def sample_pair(rng: random.Random, wrong: int, swap: str) -> tuple[list[SceneObject], list[SceneObject]]:
    """A (scene, rejected scene) pair of one bucket, drawn so that the pair is as likely as its mirror image.

    A scene is drawn, then one of its rejected scenes uniformly, and the draw is kept with probability
    ``(number of rejected scenes) / (the most any scene has)``: every (scene, rejected) edge of the bucket is then
    equally likely, and since the swap relation is symmetric, (A, B) as likely as (B, A). Text alone cannot tell
    which answer is the true one (:mod:`dama_engine.proving.blank_check` measures it).
    """
    most = _most_swaps(wrong, swap)
    while True:
        scene = sample_scene(rng)
        if len(scene) < wrong:
            continue
        options = swapped_scenes(scene, wrong, swap)
        if options and rng.random() < len(options) / most:
            return scene, rng.choice(options)


def oracle_logit(truth: SceneObject, said: SceneObject) -> float:
    """The oracle scorer's logit for one object phrase against the true object at its position (fixed constants)."""
    colour_similarity = 1.0 - colour_steps(truth.colour, said.colour) / 3.0
    shape_match = float(truth.shape == said.shape)
    return ORACLE_SCALE * (ORACLE_COLOUR_WEIGHT * colour_similarity + (1 - ORACLE_COLOUR_WEIGHT) * shape_match)


def oracle_hardness(scene: list[SceneObject], rejected: list[SceneObject]) -> float:
    """delta_i of one pair: :func:`dama_engine.objective.hardness.joint_softmax` over both answers' object phrases."""
    import torch

    from dama_engine.objective import flat_index, joint_softmax

    logits = [oracle_logit(truth, truth) for truth in scene] + [
        oracle_logit(truth, said) for truth, said in zip(scene, rejected, strict=True)
    ]
    pair_index, is_chosen = flat_index([len(scene)], [len(rejected)])
    return float(joint_softmax(torch.tensor(logits), pair_index, is_chosen, 1)[0])


def draw_scene(scene: list[SceneObject], rng: random.Random, image_size: int) -> Image.Image:
    """Each object in its cell of the 2x2 grid, filling most of it (position and size jittered)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size // 2
    for item in scene:
        cell_index = POSITIONS.index(item.position)
        radius = cell * rng.uniform(0.32, 0.42)
        margin = radius + 1
        cx = (cell_index % 2) * cell + rng.uniform(margin, cell - margin)
        cy = (cell_index // 2) * cell + rng.uniform(margin, cell - margin)
        _draw_shape(draw, item.shape, cx, cy, radius, COLOURS[item.colour])
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        half = radius * 0.85
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        points = [_polar(cx, cy, radius, 90 + 120 * k) for k in range(3)]
        draw.polygon(points, fill=fill)
    elif shape == "star":
        points = [_polar(cx, cy, radius if k % 2 == 0 else radius * 0.45, 90 + 36 * k) for k in range(10)]
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _polar(cx: float, cy: float, radius: float, degrees: float) -> tuple[float, float]:
    # Screen y grows downwards: 90 degrees points up.
    angle = math.radians(degrees)
    return cx + radius * math.cos(angle), cy - radius * math.sin(angle)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
