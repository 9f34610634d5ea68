"""``/models``: the supported model families, their default LoRA targets, and the built-in tiny models.

The table is ``dama_settings.families`` (torch-free; the API must not import the engine), from which
``dama_engine.families`` takes the same layouts.
"""

from __future__ import annotations

import re

from fastapi import APIRouter

from api.deps import CurrentTenant
from api.schemas import ModelCatalogPublic, ModelFamilyPublic, TinyModelPublic
from dama_settings.families import FAMILY_LAYOUTS, FamilyLayout
from jobstore.spec import TINY_MODELS

router = APIRouter(prefix="/models", tags=["models"])


def _family(layout: FamilyLayout) -> ModelFamilyPublic:
    leaves = "|".join(re.escape(leaf) for leaf in layout.lora_leaf_names)
    prefix = layout.language_model_prefix
    return ModelFamilyPublic(
        name=layout.name,
        model_types=list(layout.model_types),
        language_model_prefix=prefix,
        default_lora_target_modules=list(layout.lora_leaf_names),
        # The same regex as dama_engine.families.FamilySpec.lora_target_regex (tests/test_settings.py checks it).
        default_lora_target_regex=rf"{re.escape(prefix)}\.(?:.*\.)?(?:{leaves})",
        vision_tower_prefixes=list(layout.vision_tower_prefixes),
        projector_prefixes=list(layout.projector_prefixes),
    )


FAMILIES = tuple(_family(layout) for layout in FAMILY_LAYOUTS)

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
