"""The benchmark's model shapes, from the engine's tiny LLaVA (:func:`dama_engine.models.tiny.build_tiny_model`).

Adapter, to delete once the engine's builder takes sizes: ``build_tiny_model("llava")`` writes the family's
processor, tokenizer, chat template and config, loaded here with ``from_pretrained`` as a real checkpoint; the
workload then resizes that config (vision tower, language model, 336 px images in 14 px patches, as LLaVA-1.5)
and the processor's image size, and the model is built from the resized config with random weights on the
device (a 7B shape is never written to disk). Nothing else is built by hand for the policy model.

The engine change that would delete :func:`load_tiny_llava`, :func:`resize_processor` and :func:`resize_config`:
``build_tiny_model("llava", ...)`` taking ``image_size`` and ``patch_size`` and per-tower config overrides
(``vision_config={...}``, ``text_config={...}``, applied before the config is built, as ``hidden_size`` is now),
and ``weights=False`` to write the processor and config only (a 7B shape is built on the GPU, not saved). The
benchmark would then load the processor and config with ``from_pretrained`` and keep :func:`random_model`.

The hardness pre-pass's CLIP is the engine's tiny CLIP at the workload's sizes.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from dama_engine.models import build_tiny_model
from dama_engine.models.tiny import build_tiny_clip

PATCH_SIZE = 14
"""The vision towers' patch (CLIP ViT-L/14, as LLaVA-1.5); the engine's tiny LLaVA uses 8 at 32 px."""


def vision_tokens(image_size: int) -> int:
    """Vision-tower tokens per image: the patches and the CLS token."""
    return (image_size // PATCH_SIZE) ** 2 + 1


def load_tiny_llava() -> tuple[Any, Any]:
    """The engine's tiny LLaVA processor and config, built into a scratch folder and loaded from it."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Writing model shards" bar on stderr in every child
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tiny-llava-") as folder:
            path = build_tiny_model("llava", Path(folder), seed=0)
            return AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path)
    finally:
        if bars:
            logging.enable_progress_bar()


def resize_processor(processor: Any, image_size: int) -> Any:
    """Square ``image_size`` images in :data:`PATCH_SIZE` patches: the processor counts image tokens from these."""
    processor.image_processor.size = {"shortest_edge": image_size}
    processor.image_processor.crop_size = {"height": image_size, "width": image_size}
    processor.patch_size = PATCH_SIZE
    return processor


def resize_config(config: Any, *, vision: dict[str, Any], text: dict[str, Any], image_size: int) -> Any:
    """The tiny config with the workload's sizes: ``vision`` and ``text`` override the towers' fields."""
    config.vision_config = _resized(
        config.vision_config, {**vision, "image_size": image_size, "patch_size": PATCH_SIZE}
    )
    config.text_config = _resized(config.text_config, text)
    config.image_seq_length = vision_tokens(image_size) - 1  # the "default" strategy drops the CLS token
    return config


def _resized(sub_config: Any, overrides: dict[str, Any]) -> Any:
    """A sub-config rebuilt with ``overrides``; fields its class derives from others (``head_dim``) derived again."""
    values = {key: value for key, value in sub_config.to_dict().items() if key != "head_dim"}
    return type(sub_config)(**{**values, **overrides})


def random_model(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The config's model class with random weights (seed 0), built in ``dtype`` directly on ``device``."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    with torch.device(device):
        # A copy: what the trainers set on a model's config (use_cache, ...) stays off the next model.
        return AutoModelForImageTextToText.from_config(copy.deepcopy(config), dtype=dtype)


def build_clip(
    *, vision: dict[str, Any], text: dict[str, Any], projection: int, image_size: int, device: torch.device
) -> tuple[Any, Any]:
    """A random CLIPModel of the given sizes (the engine's :func:`~dama_engine.models.tiny.build_tiny_clip`, CLIP's own
    vocabulary size) and its processor, on ``device`` (for the hardness pre-pass)."""
    text = {**text, "vocab_size": 49408}
    clip, processor = build_tiny_clip(
        image_size=image_size, patch_size=PATCH_SIZE, vision=vision, text=text, projection_dim=projection
    )
    return clip.to(device), processor
