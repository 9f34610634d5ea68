"""Named starting points for a job spec: a preset fills the fields a request leaves out, the request's own values
win. One preset so far:

``paper``: the DAMA paper's released training recipe for LLaVA-1.5-7B/13B (``shared/DAMA.md`` section 6): DAMA,
a full fine-tune with the vision tower frozen (the projector and the language model train), learning rate 5e-7
with a cosine schedule after a 0.1 warmup, weight decay 0, 4 epochs, a global batch of 16, bf16, sequences up to
2048 tokens, reference log-probs computed once. The released code shards with DeepSpeed ZeRO-3 on 4 GPUs; here
FSDP2 on 4 GPUs (``strategy: fsdp``; ``batch_size`` is per GPU: 4 pairs each, 16 per step; on 8 GPUs a request
sets ``batch_size`` 2 to keep 16), gradient checkpointing on. Memory per GPU on 4
and 8 GPUs: ``docs/PERFORMANCE.md``. Precision is the worker's (bf16 on GPUs that have it); a full fine-tune
keeps float32 master weights.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "method": "dama",
        "gpus": 4,
        "strategy": "fsdp",
        "lora": {"enabled": False, "train_projector": True},
        "hyperparameters": {
            "learning_rate": 5e-7,
            "epochs": 4,
            "batch_size": 4,  # per GPU: 4 x 4 GPUs = the global batch of 16
            "grad_accumulation": 1,
            "warmup_ratio": 0.1,
            "weight_decay": 0.0,
            "max_length": 2048,
            "gradient_checkpointing": True,
        },
    },
}


def with_preset(values: dict[str, Any], preset: str) -> dict[str, Any]:
    """``values`` (a request's fields) on top of the preset's: the request's own values win, section by section."""
    merged: dict[str, Any] = copy.deepcopy(PRESETS[preset])
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
