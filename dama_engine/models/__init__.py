"""Models: the families the engine knows (:mod:`.families`), loading a model, its processor and its adapters
(:mod:`.loading`), and the tiny models the tests and the demo build from configs (:mod:`.tiny`).
"""

from dama_engine.models.families import family_for
from dama_engine.models.loading import (
    adapter_identity,
    is_peft,
    load_model,
    load_processor,
    make_trainable,
    resolve_dtype,
    trainable_state_dict,
    unwrap_model,
)
from dama_engine.models.tiny import build_tiny_model

__all__ = [
    "adapter_identity",
    "build_tiny_model",
    "family_for",
    "is_peft",
    "load_model",
    "load_processor",
    "make_trainable",
    "resolve_dtype",
    "trainable_state_dict",
    "unwrap_model",
]
