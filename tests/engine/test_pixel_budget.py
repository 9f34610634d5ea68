"""Pixel budgets (``data.max_pixels``, ``data.min_pixels``, ``data.max_image_side``): a large image is resized to
fit before the processor sees it, never cut in tokens; a row still over ``max_length`` is refused with its row
number; the budget is part of the reference cache key. Tiny LLaVA (fixed image tokens) and tiny Qwen2-VL (image
tokens follow the area) built here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dama_engine.config import ModelSection, parse_config
from dama_engine.data import DataError, ImageSource, PixelBudget, PreferenceRow
from dama_engine.forward import PairEncoder, check_lengths
from dama_engine.models import load_processor
from dama_engine.training.recipe import _model_identity
from tests.engine.conftest import make_row, png_bytes

LARGE = (1400, 700)


def _large_row(index: int = 0) -> PreferenceRow:
    row = make_row(index, "A red circle.", "A blue square.")
    return dataclasses.replace(row, images=(ImageSource(data=png_bytes((200, 30, 30), LARGE)),))


class _SeenSizes:
    """Wraps a processor and records the sizes of the images handed to it."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, *args: Any, images: Any = None, **kwargs: Any) -> Any:
        self.sizes += [image.size for image in images or []]
        return self.processor(*args, images=images, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)


def test_fit_keeps_the_aspect_and_meets_each_bound() -> None:
    image = Image.new("RGB", LARGE)
    assert PixelBudget().fit(image) is image and not PixelBudget().is_set
    small = PixelBudget(max_pixels=200_000).fit(image)
    assert small.width * small.height <= 200_000 and abs(small.width / small.height - 2) < 0.02
    assert PixelBudget(max_side=336).fit(image).size == (336, 168)
    grown = PixelBudget(min_pixels=4_000_000).fit(image)
    assert grown.width * grown.height >= 4_000_000
    both = PixelBudget(max_pixels=10**9, max_side=500).fit(image)
    assert both.size == (500, 250)


def test_llava_gets_the_resized_image_and_keeps_every_image_token(tiny_models: dict[str, Path]) -> None:
    processor = load_processor(ModelSection(name_or_path=str(tiny_models["llava"])), PixelBudget(max_side=64))
    plain = PairEncoder(processor, max_length=256).encode(_large_row())
    seen = _SeenSizes(processor)
    budgeted = PairEncoder(seen, max_length=256, pixels=PixelBudget(max_side=64)).encode(_large_row())
    assert seen.sizes == [(64, 32)]
    # LLaVA's image tokens are fixed: the resized image gives every one of them, the same prompt.
    assert budgeted.prompt_ids == plain.prompt_ids
    assert budgeted.vision["pixel_values"].shape == plain.vision["pixel_values"].shape


def test_qwen2_vl_max_pixels_resizes_the_image_and_lowers_its_token_count(tiny_models: dict[str, Path]) -> None:
    section = ModelSection(name_or_path=str(tiny_models["qwen2_vl"]))
    max_pixels = 28 * 28 * 8  # between the tiny processor's own bounds, 28 x 28 x 4 and 28 x 28 x 16
    budget = PixelBudget(max_pixels=max_pixels)
    processor = load_processor(section, budget)
    assert processor.image_processor.size["longest_edge"] == max_pixels  # the processor's bound too
    plain = PairEncoder(load_processor(section), max_length=4096).encode(_large_row())
    budgeted = PairEncoder(processor, max_length=4096, pixels=budget).encode(_large_row())
    grid = budgeted.vision["image_grid_thw"][0]
    assert int(grid.prod()) * 14 * 14 <= max_pixels  # patches of 14 x 14 pixels
    image_tokens = budgeted.prompt_ids.count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert image_tokens == int(grid.prod()) // 4  # every merged patch has its token: none cut
    assert len(budgeted.prompt_ids) < len(plain.prompt_ids)

    # A max_length between the two: without the budget the row is refused, naming it; with it the row fits.
    max_length = budgeted.length
    rows = [make_row(0, "A red circle.", "A blue square."), _large_row(1)]
    with pytest.raises(DataError, match=r"row 2: (chosen|rejected): \d+ prompt \+ \d+ answer tokens exceed max_len"):
        check_lengths(PairEncoder(load_processor(section), max_length=max_length), rows, "train", False)
    assert check_lengths(PairEncoder(processor, max_length=max_length, pixels=budget), rows, "train", False) == rows


def test_the_pixel_budget_is_part_of_the_reference_cache_key(tiny_models: dict[str, Path]) -> None:
    def identity(*overrides: str) -> dict[str, Any]:
        values: dict[str, Any] = {"model": {"name_or_path": str(tiny_models["llava"])}, "data": {"train": "t"}}
        for override in overrides:
            key, _, value = override.partition("=")
            values["data"][key] = int(value)
        return _model_identity(parse_config(values), None, bf16=False, commit=None)

    unset = identity()
    assert "pixels" not in unset  # runs without a budget keep the keys they had
    assert identity("max_pixels=200000") != identity("max_pixels=100000") != unset
    assert identity("max_image_side=336") != unset
