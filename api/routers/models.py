"""``/models``: the supported model families, their default LoRA targets, and the built-in tiny models.

The table is ``dama_settings.families`` (torch-free; the API must not import the engine), from which
``dama_engine.models.families`` takes the same layouts.
"""

from __future__ import annotations

import re

from fastapi import APIRouter

from api.deps import CurrentTenant, ServicesDep
from api.schemas import ModelCatalogPublic, ModelFamilyPublic, TinyModelPublic
from dama_settings.families import FAMILY_LAYOUTS, FamilyLayout
from jobstore.spec import BUILTIN_MODELS, SEEING_MODEL

router = APIRouter(prefix="/models", tags=["models"])


def _family(layout: FamilyLayout) -> ModelFamilyPublic:
    leaves = "|".join(re.escape(leaf) for leaf in layout.lora_leaf_names)
    prefix = layout.language_model_prefix
    return ModelFamilyPublic(
        name=layout.name,
        model_types=list(layout.model_types),
        language_model_prefix=prefix,
        default_lora_target_modules=list(layout.lora_leaf_names),
        # The same regex as dama_engine.models.families.FamilySpec.lora_target_regex (tests/test_settings.py checks it).
        default_lora_target_regex=rf"{re.escape(prefix)}\.(?:.*\.)?(?:{leaves})",
        vision_tower_prefixes=list(layout.vision_tower_prefixes),
        projector_prefixes=list(layout.projector_prefixes),
    )


FAMILIES = tuple(_family(layout) for layout in FAMILY_LAYOUTS)

_TINY_DESCRIPTIONS = {
    "dama/tiny-llava": "A tiny randomly initialised LLaVA built on the worker: for trying the service on a CPU.",
    "dama/tiny-qwen2-vl": "A tiny randomly initialised Qwen2-VL built on the worker: for trying the service on a CPU.",
    "dama/tiny-idefics3": "A tiny randomly initialised Idefics3 built on the worker: for trying the service on a CPU.",
    SEEING_MODEL: "A tiny LLaVA that sees the shapes world (dama_engine.proving.shapes) and calls orange objects red: "
    "the proving ground's base, trained on the worker on first use (about 1 min on a CPU core). Give it a trained "
    "model's settings (no tiny-model learning rate applies); scripts/dama.sh demo tunes it on its own on-policy "
    "pairs and measures hallucination before and after.",
}
TINY = tuple(
    TinyModelPublic(name=name, family=family, description=_TINY_DESCRIPTIONS[name])
    for name, family in BUILTIN_MODELS.items()
)


@router.get(
    "",
    summary="Supported models",
    description="Model families a job's base model may belong to (any model of these transformers model types), "
    "with their default LoRA targets, the built-in tiny models (a `dama/...` name not listed here is refused at "
    "POST /jobs), and the CLIP hardness scorer the workers use for rows without hardness (null: none).",
)
def list_models(_tenant: CurrentTenant, services: ServicesDep) -> ModelCatalogPublic:
    return ModelCatalogPublic(
        families=list(FAMILIES), tiny_models=list(TINY), hardness_scorer=services.settings.hardness_scorer
    )
