"""Shapes world v2 (dama_engine.proving.shapes): deterministic, ground truth for every scene, pairs that differ only
by swaps the image exposes, hardness graded by the oracle, and no text-only cue in any bucket."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from statistics import mean

import pytest
from PIL import Image

from dama_engine.data.formats import load_and_validate
from dama_engine.data.rows import PreferenceRow
from dama_engine.proving.blank_check import text_only_check
from dama_engine.proving.shapes import (
    BUCKETS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SceneObject,
    colour_steps,
    describe_scene,
    make_demo_dataset,
    oracle_hardness,
)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


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


def test_pairs_are_swaps_only_of_the_ground_truth(tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=80, n_eval=8, n_generative=0, with_hardness=True)
    assert demo.bucket_counts == {f"{wrong}x{swap}": 10 for wrong, swap in BUCKETS}
    rows, report = load_and_validate(demo.train)
    assert report.ok, str(report)
    for row in rows:
        scene = [SceneObject(**item) for item in row.meta["scene"]]
        assert [item.position for item in scene] == sorted((o.position for o in scene), key=POSITIONS.index)
        assert row.chosen == describe_scene(scene) and row.meta["objects"] == [item.name for item in scene]
        # Same words in the same places but for the swapped colour or shape words: no length or structure cue.
        chosen, rejected = row.chosen.split(), row.rejected.split()
        assert len(chosen) == len(rejected)
        changed = [(a.strip(",."), b.strip(",.")) for a, b in zip(chosen, rejected, strict=True) if a != b]
        assert len(changed) == row.meta["wrong"]
        for true_word, said in changed:
            if row.meta["swap"] == "shape":
                assert true_word in SHAPES and said in SHAPES and said not in {o.shape for o in scene}
            else:
                assert said in COLOURS and said not in {o.colour for o in scene}
                assert (colour_steps(true_word, said) == 1) == (row.meta["swap"] == "near_colour")
        # The image shows exactly the true colours (plus the white background).
        image = row.images[0].load()
        present = {colour for _, colour in image.getcolors(maxcolors=64) or []}
        assert present == {COLOURS[item.colour] for item in scene} | {(255, 255, 255)}


def test_oracle_hardness_grades_near_colours_and_fewer_wrong_objects_harder(tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=160, n_eval=0, n_generative=0, image_size=32, with_hardness=True)
    rows = [json.loads(line) for line in demo.train.read_text().splitlines()]
    by_bucket = {bucket: mean(r["hardness"] for r in rows if r["bucket"] == bucket) for bucket in demo.bucket_counts}
    for wrong in (1, 2, 3):
        assert by_bucket[f"{wrong}xnear_colour"] < by_bucket[f"{wrong}xfar_colour"]
    for swap in ("near_colour", "far_colour"):
        assert by_bucket[f"1x{swap}"] < by_bucket[f"2x{swap}"] < by_bucket[f"3x{swap}"]
    assert all(-1 <= r["hardness"] <= 1 for r in rows)
    # A fixed, documented oracle: one near-colour swap of a lone object.
    truth = [SceneObject("red", "circle", "top left")]
    said = [SceneObject("orange", "circle", "top left")]
    assert oracle_hardness(truth, said) == pytest.approx(0.3941, abs=1e-3)  # tanh((5 - 25/6) / 2)


def test_text_alone_sits_at_chance_in_every_bucket(tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=1600, n_eval=1600, n_generative=0, image_size=32)
    train, _ = load_and_validate(demo.train)
    held_out, _ = load_and_validate(demo.eval)
    report = text_only_check(train, held_out)
    assert set(report.per_bucket) == {f"{wrong}x{swap}" for wrong, swap in BUCKETS}
    assert abs(report.overall - 0.5) < 0.04, report
    assert all(abs(accuracy - 0.5) < 0.1 for accuracy in report.per_bucket.values()), report

    # The check sees a cue when there is one: rejected answers one object longer are told apart at once.
    def longer(row: PreferenceRow) -> PreferenceRow:
        return dataclasses.replace(row, rejected=row.rejected.rstrip(".") + " and a red star at the top left.")

    cued = text_only_check([longer(r) for r in train], [longer(r) for r in held_out])
    assert cued.overall > 0.95


def test_generative_eval_carries_each_scenes_ground_truth(tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=4, n_eval=4, n_generative=5, image_size=48)
    records = [json.loads(line) for line in demo.generative_eval.read_text().splitlines()]
    assert len(records) == 5
    vocabulary = json.loads(demo.vocabulary.read_text())
    assert set(vocabulary["objects"]) == set(SHAPES) and set(vocabulary["colours"]) == set(COLOURS)
    for record in records:
        assert set(record) == {"id", "image", "prompt", "objects", "scene"}
        assert 1 <= len(record["objects"]) <= 3
        assert record["objects"] == [f"{o['colour']} {o['shape']}" for o in record["scene"]]
        with Image.open(demo.root / record["image"]) as image:
            assert image.size == (48, 48)
