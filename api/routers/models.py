"""``/models``: the supported model families, their default LoRA targets, and the built-in tiny models.

A small copy of ``dama_engine.families`` (names only): the API must not import the engine. The engine's registry
is the source of truth; keep this table in step with it when a family is added.
"""

from __future__ import annotations

import re

from fastapi import APIRouter

from api.deps import CurrentTenant
from api.schemas import ModelCatalogPublic, ModelFamilyPublic, TinyModelPublic
from jobstore.spec import TINY_MODELS

router = APIRouter(prefix="/models", tags=["models"])

LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _family(
    name: str,
    model_types: tuple[str, ...],
    language_model_prefix: str,
    vision_tower_prefixes: tuple[str, ...],
    projector_prefixes: tuple[str, ...],
) -> ModelFamilyPublic:
    leaves = "|".join(re.escape(leaf) for leaf in LM_PROJECTIONS)
    return ModelFamilyPublic(
        name=name,
        model_types=list(model_types),
        language_model_prefix=language_model_prefix,
        default_lora_target_modules=list(LM_PROJECTIONS),
        default_lora_target_regex=rf"{re.escape(language_model_prefix)}\.(?:.*\.)?(?:{leaves})",
        vision_tower_prefixes=list(vision_tower_prefixes),
        projector_prefixes=list(projector_prefixes),
    )


FAMILIES = (
    _family(
        "llava",
        ("llava", "llava_next", "llava_onevision"),
        "model.language_model",
        ("model.vision_tower",),
        ("model.multi_modal_projector", "model.image_newline"),
    ),
    _family(
        "qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "model.language_model", ("model.visual",), ("model.visual.merger",)
    ),
    _family("idefics3", ("idefics3", "smolvlm"), "model.text_model", ("model.vision_model",), ("model.connector",)),
)

_TINY_DESCRIPTIONS = {
    "llava": "A tiny randomly initialised LLaVA built on the worker: for trying the service on a CPU.",
    "qwen2_vl": "A tiny randomly initialised Qwen2-VL built on the worker: for trying the service on a CPU.",
    "idefics3": "A tiny randomly initialised Idefics3 built on the worker: for trying the service on a CPU.",
}
TINY = tuple(
    TinyModelPublic(name=name, family=family, description=_TINY_DESCRIPTIONS[family])
    for name, family in TINY_MODELS.items()
)


@router.get(
    "",
    summary="Supported models",
    description="Model families a job's base model may belong to (any model of these transformers model types), "
    "with their default LoRA targets, and the built-in tiny models.",
)
def list_models(_tenant: CurrentTenant) -> ModelCatalogPublic:
    return ModelCatalogPublic(families=list(FAMILIES), tiny_models=list(TINY))
