"""Shared fixtures: tiny models of each family and the proving ground, built once per session, and small preference
rows."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, TextPart
from dama_engine.models.tiny import build_tiny_model


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def make_row(index: int, chosen: str, rejected: str, colour: tuple[int, int, int] = (200, 30, 30)) -> PreferenceRow:
    prompt = (Message(role="user", content=(ImagePart(), TextPart("What is in the image?"))),)
    return PreferenceRow(
        row_id=str(index),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        images=(ImageSource(data=png_bytes(colour)),),
        row_number=index + 1,
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_model(family, root / family, seed=0) for family in ("llava", "qwen2_vl", "idefics3")}


@pytest.fixture
def rows() -> list[PreferenceRow]:
    return [
        make_row(0, "A red circle.", "A blue square and a green star.", (220, 20, 20)),
        make_row(1, "Two yellow triangles on a white background.", "A cat.", (240, 240, 20)),
        make_row(2, "A green square.", "A green circle.", (20, 200, 20)),
    ]
