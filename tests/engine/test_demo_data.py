"""The synthetic demo dataset: deterministic, valid, and every rejected answer wrong in a way the image shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from dama_engine.data.demo import COLOURS, CORRUPTIONS, SHAPES, make_demo_dataset
from dama_engine.data.formats import load_and_validate

OBJECT = re.compile(r"\b(?:a|A) (\w+) (\w+)")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def described(answer: str) -> set[str]:
    return {f"{colour} {shape}" for colour, shape in OBJECT.findall(answer.removesuffix(" on a white background."))}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = make_demo_dataset(tmp_path / "a", n_train=12, n_eval=4, n_generative=4, seed=3)
    make_demo_dataset(tmp_path / "b", n_train=12, n_eval=4, n_generative=4, seed=3)
    make_demo_dataset(tmp_path / "c", n_train=12, n_eval=4, n_generative=4, seed=4)
    files = snapshot(first.root)
    assert files == snapshot(tmp_path / "b")
    assert files != snapshot(tmp_path / "c")
    assert sorted(name for name in files if not name.startswith("images/")) == [
        "eval.jsonl",
        "generative_eval.jsonl",
        "train.jsonl",
        "vocabulary.json",
    ]
    assert len([name for name in files if name.startswith("images/")]) == 12 + 4 + 4


def test_rows_are_valid_and_corruptions_are_visible(tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=40, n_eval=8, n_generative=6, with_hardness=True)
    assert demo.corruption_counts == dict.fromkeys(CORRUPTIONS, 10)
    rows, report = load_and_validate(demo.train)
    assert report.ok, str(report)
    assert len(rows) == demo.n_train == 40
    eval_rows, eval_report = load_and_validate(demo.eval)
    assert eval_report.ok and len(eval_rows) == 8
    assert {row.meta["corruption"] for row in eval_rows} == set(CORRUPTIONS)

    for row in rows:
        truth = set(row.meta["objects"])
        chosen, rejected = described(row.chosen), described(row.rejected)
        corruption = row.meta["corruption"]
        assert row.chosen != row.rejected
        assert chosen == truth and rejected != truth
        assert len(row.chosen.split()) < 20 and len(row.rejected.split()) < 20
        assert row.hardness is not None
        true_colours = {name.split()[0] for name in truth}
        true_shapes = {name.split()[1] for name in truth}
        wrong = rejected - truth
        if corruption == "all_wrong":
            assert len(rejected) == len(truth)
            assert all(name.split()[0] not in true_colours and name.split()[1] not in true_shapes for name in rejected)
        elif corruption == "object_added":
            assert rejected > truth and len(wrong) == 1
        else:
            (kept_wrong,) = wrong
            colour, shape = kept_wrong.split()
            assert len(rejected) == len(truth)
            if corruption == "colour_swapped":
                assert colour not in true_colours and shape in true_shapes
            else:
                assert shape not in true_shapes and colour in true_colours

        # The image shows exactly the true colours (plus the white background).
        image = row.images[0].load()
        present = {colour for _, colour in image.getcolors(maxcolors=64) or []}
        assert present == {COLOURS[name] for name in true_colours} | {(255, 255, 255)}


def test_generative_eval_and_vocabulary(tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=4, n_eval=4, n_generative=5, image_size=48)
    records = [json.loads(line) for line in demo.generative_eval.read_text().splitlines()]
    assert len(records) == 5
    vocabulary = json.loads(demo.vocabulary.read_text())
    assert set(vocabulary["objects"]) == set(SHAPES) and set(vocabulary["colours"]) == set(COLOURS)
    assert all(name in synonyms for name, synonyms in vocabulary["objects"].items())
    for record in records:
        assert set(record) == {"id", "image", "prompt", "objects"}
        assert 1 <= len(record["objects"]) <= 3
        for name in record["objects"]:
            colour, shape = name.split()
            assert colour in COLOURS and shape in SHAPES
        with Image.open(demo.root / record["image"]) as image:
            assert image.size == (48, 48)
