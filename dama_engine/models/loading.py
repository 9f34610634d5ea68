"""Loading a vision-language model and its processor, and making the trainable part (LoRA or full).

Any model that transformers loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` works, by hub name or
local path. The reference model of DPO is this same model with the LoRA adapter switched off: never a copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from dama_engine.config import ConfigError, LoraSection, ModelSection
from dama_engine.data import PixelBudget
from dama_engine.models.families import family_for


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (``auto``), else float32."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_processor(section: ModelSection, pixels: PixelBudget | None = None) -> Any:
    """The model's processor; with ``pixels``, a processor that takes a pixel budget (Qwen2-VL: ``size`` as
    ``shortest_edge`` / ``longest_edge`` in pixels) gets ``min_pixels`` / ``max_pixels``, so its resizing (to whole
    patches) stays inside the same bounds."""
    where = {"revision": section.revision, "trust_remote_code": section.trust_remote_code}
    processor = AutoProcessor.from_pretrained(section.name_or_path, **where)
    if pixels is None or (pixels.max_pixels is None and pixels.min_pixels is None):
        return processor
    if not family_for(AutoConfig.from_pretrained(section.name_or_path, **where)).processor_pixel_budget:
        return processor
    size = processor.image_processor.size
    bounds = {
        "shortest_edge": pixels.min_pixels if pixels.min_pixels is not None else size["shortest_edge"],
        "longest_edge": pixels.max_pixels if pixels.max_pixels is not None else size["longest_edge"],
    }
    return AutoProcessor.from_pretrained(section.name_or_path, size=bounds, **where)


def load_model(section: ModelSection, *, dtype: torch.dtype) -> Any:
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": section.revision}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    return AutoModelForImageTextToText.from_pretrained(
        section.name_or_path, trust_remote_code=section.trust_remote_code, **kwargs
    )


def make_trainable(model: Any, section: LoraSection, *, init_adapter: str | None = None) -> Any:
    """Wrap ``model`` for training: a peft LoRA adapter on the language model (default) or full fine-tuning.

    The vision tower stays frozen unless ``freeze_vision_tower`` is off; the projector is trained in full
    only when ``train_projector`` is on. ``init_adapter`` (a PEFT folder) is loaded as the trainable adapter
    instead of a fresh one: training goes on from its weights, and the result still applies to the plain base.
    """
    family = family_for(model)
    if init_adapter is not None:
        if not section.enabled:
            raise ConfigError("model.init_adapter: starting from an adapter needs lora.enabled (a LoRA run)")
        peft_model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        _unfreeze_vision_tower(peft_model, section, family)
        return peft_model
    if section.enabled:
        projector = [name for name, _ in model.named_modules() if name in family.projector_prefixes]
        config = LoraConfig(
            r=section.r,
            lora_alpha=section.alpha,
            lora_dropout=section.dropout,
            # A regex over the language model's projections keeps LoRA off the vision tower and projector.
            target_modules=section.target_modules or family.lora_target_regex,
            modules_to_save=projector if section.train_projector else None,
            bias="none",
        )
        peft_model = get_peft_model(model, config)
        _unfreeze_vision_tower(peft_model, section, family)
        return peft_model
    for name, parameter in model.named_parameters():
        frozen_vision = section.freeze_vision_tower and family.is_vision_tower_param(name)
        frozen_projector = not section.train_projector and family.is_projector_param(name)
        parameter.requires_grad_(not (frozen_vision or frozen_projector))
    return model


def _unfreeze_vision_tower(peft_model: Any, section: LoraSection, family: Any) -> None:
    if not section.freeze_vision_tower:
        for name, parameter in peft_model.named_parameters():
            if family.is_vision_tower_param(name):
                parameter.requires_grad_(True)


def adapter_identity(folder: str) -> list[str]:
    """Content hashes of a PEFT adapter's config and weights: the starting adapter's part of the reference cache
    key (its other files, such as a model card that evaluation appends to, do not change any log-prob)."""
    files = (Path(folder) / "adapter_config.json", Path(folder) / "adapter_model.safetensors")
    return [hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else "missing" for file in files]


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The trained weights only (adapter, saved projector, or every trainable tensor in full fine-tuning)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def is_peft(model: Any) -> bool:
    return isinstance(model, PeftModel)


def unwrap_model(model: Any) -> Any:
    """The transformers model inside DDP (``.module``) and peft (``get_base_model()``) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
