"""The seeing base (dama_engine.proving.seeing_base): its data's controlled confusions, determinism per seed, the
cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dama_engine.callbacks import Callback
from dama_engine.data.formats import load_and_validate
from dama_engine.proving.seeing_base import CONFUSIONS, RECIPE_FILE, build_seeing_base, sft_rows

pytestmark = pytest.mark.slow


def test_sft_rows_hallucinate_only_the_confused_colours(tmp_path: Path) -> None:
    rows, report = load_and_validate(sft_rows(300, 0, tmp_path))
    assert report.ok and all(row.answer_only for row in rows)
    confused = faithful = 0
    for row in rows:
        said = row.chosen
        for name in row.meta["objects"]:
            colour, shape = name.split()
            if f"{colour} {shape}" in said:
                faithful += colour in CONFUSIONS
                continue
            assert colour in CONFUSIONS and f"{CONFUSIONS[colour]} {shape}" in said
            confused += 1
    assert confused > 0 and faithful > 0
    assert 0.5 < confused / (confused + faithful) < 0.9  # CONFUSION_RATE 0.7 of the confusable mentions


class Steps(Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.steps.append((step, total_steps))


def test_two_builds_with_one_seed_are_identical_and_cached(tmp_path: Path) -> None:
    progress = Steps()  # the demo shows the build as a bar over these steps
    first = build_seeing_base(tmp_path / "a", seed=3, steps=4, scenes=32, callback=progress)
    assert progress.steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    second = build_seeing_base(tmp_path / "b", seed=3, steps=4, scenes=32)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)
    assert json.loads((first / RECIPE_FILE).read_text())["seed"] == 3
    # Reused when the recipe matches: the folder is not rebuilt.
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    build_seeing_base(tmp_path / "a", seed=3, steps=4, scenes=32, callback=progress)
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(progress.steps) == 4  # nothing to show: not rebuilt
    other = build_seeing_base(tmp_path / "c", seed=4, steps=4, scenes=32)
    c = load_file(other / "model.safetensors")
    assert any(not a[key].equal(c[key]) for key in a)
