"""The supported model families by name and module layout: what ``GET /models`` lists.

``dama_engine.models.families`` holds the full specs (inputs, position ids, notes) and takes its layout from here
(tests/test_settings.py fails if the two ever differ).
"""

from __future__ import annotations

from dataclasses import dataclass

LM_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Leaf names of the decoder's attention and MLP projections: the default LoRA targets."""


@dataclass(frozen=True)
class FamilyLayout:
    name: str
    model_types: tuple[str, ...]
    language_model_prefix: str
    vision_tower_prefixes: tuple[str, ...]
    projector_prefixes: tuple[str, ...]
    lora_leaf_names: tuple[str, ...] = LM_PROJECTIONS


LLAVA = FamilyLayout(
    name="llava",
    model_types=("llava", "llava_next", "llava_onevision"),
    language_model_prefix="model.language_model",
    vision_tower_prefixes=("model.vision_tower",),
    # llava_next / llava_onevision also learn an `image_newline` vector alongside the projector.
    projector_prefixes=("model.multi_modal_projector", "model.image_newline"),
)
QWEN2_VL = FamilyLayout(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    language_model_prefix="model.language_model",
    vision_tower_prefixes=("model.visual",),
    # The patch merger is Qwen2-VL's projector; it lives inside the vision tower.
    projector_prefixes=("model.visual.merger",),
)
IDEFICS3 = FamilyLayout(
    name="idefics3",
    model_types=("idefics3", "smolvlm"),
    language_model_prefix="model.text_model",
    vision_tower_prefixes=("model.vision_model",),
    projector_prefixes=("model.connector",),
)

FAMILY_LAYOUTS: tuple[FamilyLayout, ...] = (LLAVA, QWEN2_VL, IDEFICS3)
