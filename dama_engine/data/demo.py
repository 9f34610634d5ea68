"""A deterministic synthetic preference dataset: coloured shapes on a white background.

Each image holds 1-3 objects (distinct colours, distinct shapes). The chosen answer describes them truly
("A red circle and a blue square on a white background."); the rejected answer is the same sentence with a
hallucination that only the image can expose, over a spread of hardness:

- ``all_wrong``: every object described is absent (easiest pair),
- ``object_added``: the true objects plus one that is not there,
- ``shape_swapped``: one object's shape replaced by a shape not in the image,
- ``colour_swapped``: one object's colour replaced by a colour not in the image (one detail wrong, hardest).

Both answers come from one sentence template and one small vocabulary, so text alone says little about which is
right: a tiny randomly initialised VLM has to look at the colours and shapes, which it can learn in minutes on a CPU.

Written files (same seed: byte-identical):
    train.jsonl, eval.jsonl     TRL conversational preference rows, images by relative path, columns
                                ``id, prompt, chosen, rejected, images, corruption, objects`` (+ ``hardness``)
    generative_eval.jsonl       ``id, image, prompt, objects`` (true object names, e.g. "red circle")
    vocabulary.json             ``{"objects": {shape: synonyms}, "colours": {colour: synonyms}}`` for CHAIR
    images/{train,eval,gen}_NNNNN.png
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
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
# From the easiest pair to tell apart to the hardest.
CORRUPTIONS = ("all_wrong", "object_added", "shape_swapped", "colour_swapped")
# The hardness column written with ``with_hardness=True``: a stand-in for DAMA's delta_i (shared/DAMA.md section 1,
# larger = easier pair), so the data-aware strategy can run without a CLIP scorer.
CORRUPTION_HARDNESS = {"all_wrong": 0.6, "object_added": 0.3, "shape_swapped": 0.15, "colour_swapped": 0.05}
BACKGROUND = (255, 255, 255)
MAX_OBJECTS = 3

DemoObject = tuple[str, str]  # (colour, shape)


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
    corruption_counts: dict[str, int] = field(default_factory=dict)  # in the train split


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
        # Each corruption kind gets an equal share (up to one), in a shuffled order.
        kinds = [CORRUPTIONS[index % len(CORRUPTIONS)] for index in range(size)]
        rng.shuffle(kinds)
        rows = []
        for index, corruption in enumerate(kinds):
            # Two kinds keep to 1-2 true objects: object_added so the rejected answer stays within 1-3 objects,
            # all_wrong so that every described object can take a colour and a shape absent from the image.
            few = corruption in ("object_added", "all_wrong")
            objects = _sample_objects(rng, max_objects=MAX_OBJECTS - 1 if few else MAX_OBJECTS)
            image_name = f"images/{split}_{index:05d}.png"
            _draw(objects, rng, image_size).save(root / image_name, format="PNG")
            rejected_objects = _corrupt(objects, corruption, rng)
            row: dict[str, Any] = {
                "id": f"{split}-{index:05d}",
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rng.choice(PROMPTS)}]}
                ],
                "chosen": [{"role": "assistant", "content": describe(objects)}],
                "rejected": [{"role": "assistant", "content": describe(rejected_objects)}],
                "images": [image_name],
                "corruption": corruption,
                "objects": [object_name(item) for item in objects],
            }
            if with_hardness:
                row["hardness"] = CORRUPTION_HARDNESS[corruption]
            rows.append(row)
        splits[split] = rows

    generative = []
    for index in range(n_generative):
        objects = _sample_objects(rng, max_objects=MAX_OBJECTS)
        image_name = f"images/gen_{index:05d}.png"
        _draw(objects, rng, image_size).save(root / image_name, format="PNG")
        generative.append(
            {
                "id": f"gen-{index:05d}",
                "image": image_name,
                "prompt": rng.choice(PROMPTS),
                "objects": [object_name(item) for item in objects],
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
        corruption_counts={kind: sum(row["corruption"] == kind for row in splits["train"]) for kind in CORRUPTIONS},
    )


def object_name(item: DemoObject) -> str:
    return f"{item[0]} {item[1]}"


def describe(objects: list[DemoObject]) -> str:
    """``"A red circle, a blue square and a green star on a white background."``"""
    names = [f"a {object_name(item)}" for item in objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed[0].upper()}{listed[1:]} on a white background."


def _sample_objects(rng: random.Random, *, max_objects: int) -> list[DemoObject]:
    """1 to ``max_objects`` objects with distinct colours and distinct shapes."""
    count = rng.randint(1, max_objects)
    return list(zip(rng.sample(list(COLOURS), count), rng.sample(SHAPES, count), strict=True))


def _corrupt(objects: list[DemoObject], corruption: str, rng: random.Random) -> list[DemoObject]:
    """The rejected answer's objects: each kind's mistake is visible in the image (a colour or shape not there)."""
    colours = {colour for colour, _ in objects}
    shapes = {shape for _, shape in objects}
    absent_colours = [colour for colour in COLOURS if colour not in colours]
    absent_shapes = [shape for shape in SHAPES if shape not in shapes]
    if corruption == "colour_swapped":
        index = rng.randrange(len(objects))
        changed = list(objects)
        changed[index] = (rng.choice(absent_colours), objects[index][1])
        return changed
    if corruption == "shape_swapped":
        index = rng.randrange(len(objects))
        changed = list(objects)
        changed[index] = (objects[index][0], rng.choice(absent_shapes))
        return changed
    if corruption == "object_added":
        changed = list(objects)
        changed.insert(rng.randint(0, len(objects)), (rng.choice(absent_colours), rng.choice(absent_shapes)))
        return changed
    if corruption == "all_wrong":
        # As many objects, each with a colour and a shape that are not in the image (hence at most 2 true objects).
        count = len(objects)
        return list(zip(rng.sample(absent_colours, count), rng.sample(absent_shapes, count), strict=True))
    raise ValueError(f"unknown corruption {corruption!r}; expected one of {', '.join(CORRUPTIONS)}")


def _draw(objects: list[DemoObject], rng: random.Random, image_size: int) -> Image.Image:
    """Objects in distinct cells of a 2x2 grid, each filling most of its cell (position and size jittered)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size // 2
    for (colour, shape), cell_index in zip(objects, rng.sample(range(4), len(objects)), strict=False):
        radius = cell * rng.uniform(0.32, 0.42)
        margin = radius + 1
        cx = (cell_index % 2) * cell + rng.uniform(margin, cell - margin)
        cy = (cell_index // 2) * cell + rng.uniform(margin, cell - margin)
        _draw_shape(draw, shape, cx, cy, radius, COLOURS[colour])
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
