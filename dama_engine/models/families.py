"""What the engine needs to know about each vision-language model family, in one registry.

A :class:`FamilySpec` names, for one module layout of transformers' ``*ForConditionalGeneration`` classes:

* the language model's module prefix, and the LoRA targets inside it (the attention and MLP projections: LoRA
  never touches the vision tower or the projector);
* the vision tower's and the multimodal projector's prefixes, so the vision tower can be frozen and the projector
  optionally trained;
* which extra processor outputs the forward needs, and whether it takes a custom 4D attention mask and
  ``position_ids`` (what sequence packing or a hand-built mask would need).

Names are the transformers 5.x module names relative to the ``*ForConditionalGeneration`` model (checked against
5.24), e.g. ``model.language_model.layers.0.self_attn.q_proj``; under a ``peft`` wrapper they gain a
``base_model.model.`` prefix, which the ``is_*_param`` helpers accept too.

:func:`family_for` resolves a model or its config. A model type not in the registry that
``AutoModelForImageTextToText`` can load gets a generic spec read off the model itself (LoRA on every Linear
layer of its language model); anything else is refused with the list of supported types.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from dama_settings import families as layouts
from dama_settings.families import LM_PROJECTIONS as LM_PROJECTIONS

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class FamilySpec(layouts.FamilyLayout):
    """The module layout of one family of vision-language models (``dama_settings.families``: names, model types,
    module prefixes, LoRA targets) and what the engine needs besides (see the module docstring)."""

    # Processor outputs the forward needs besides input_ids / attention_mask / labels, per image-bearing batch.
    model_input_names: tuple[str, ...] = ("pixel_values",)
    # Whether forward takes a prepared 4D (batch, 1, query, key) attention mask, and explicit position_ids, and
    # their shape: "1d" is (batch, seq); "mrope" is Qwen2-VL's (3, batch, seq) from `model.model.get_rope_index`.
    accepts_4d_attention_mask: bool = True
    accepts_position_ids: bool = True
    position_ids_kind: Literal["1d", "mrope"] = "1d"
    # Whether the processor takes min_pixels / max_pixels (its image token count follows the image's area).
    processor_pixel_budget: bool = False
    notes: str = ""

    @property
    def lora_target_regex(self) -> str:
        """A regex for ``LoraConfig(target_modules=...)`` (peft full-matches it against module names)."""
        leaves = "|".join(re.escape(leaf) for leaf in self.lora_leaf_names)
        return rf"{re.escape(self.language_model_prefix)}\.(?:.*\.)?(?:{leaves})"

    def lora_target_modules(self, model: Any) -> list[str]:
        """The full names of the Linear layers of ``model`` that :attr:`lora_target_regex` selects."""
        import torch

        pattern = re.compile(self.lora_target_regex)
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
        ]

    def is_language_model_param(self, name: str) -> bool:
        return _under(name, (self.language_model_prefix,))

    def is_vision_tower_param(self, name: str) -> bool:
        """True for the vision encoder's parameters, *not* counting a projector nested inside it (Qwen2-VL)."""
        return _under(name, self.vision_tower_prefixes) and not self.is_projector_param(name)

    def is_projector_param(self, name: str) -> bool:
        return _under(name, self.projector_prefixes)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    name = name.removeprefix(_PEFT_PREFIX)
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


# Names and module layouts come from dama_settings.families (what GET /models lists); the rest is the engine's.
LLAVA = FamilySpec(
    **asdict(layouts.LLAVA),
    model_input_names=("pixel_values",),  # llava_next / llava_onevision add `image_sizes`
    notes="1D position_ids; each <image> expands to a fixed number of tokens (16 in the tiny model).",
)
QWEN2_VL = FamilySpec(
    **asdict(layouts.QWEN2_VL),
    model_input_names=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    position_ids_kind="mrope",
    processor_pixel_budget=True,
    notes=(
        "M-RoPE: position_ids are (3, batch, seq) from model.model.get_rope_index(input_ids, mm_token_type_ids, "
        "image_grid_thw=..., attention_mask=2D mask); the forward computes them itself from a 2D attention_mask "
        "and needs mm_token_type_ids whenever image_grid_thw is given. A 4D mask works only with explicit "
        "position_ids. pixel_values are patches of all images concatenated along dim 0, split by image_grid_thw."
    ),
)
IDEFICS3 = FamilySpec(
    **asdict(layouts.IDEFICS3),
    model_input_names=("pixel_values", "pixel_attention_mask"),
    notes=(
        "1D position_ids; pixel_values are (batch, images per sample, 3, H, W), padded with pixel_attention_mask; "
        "each <image> expands to <fake_token_around_image><global-img> + image_seq_len <image> + "
        "<fake_token_around_image> when image splitting is off."
    ),
)

FAMILY_SPECS: tuple[FamilySpec, ...] = (LLAVA, QWEN2_VL, IDEFICS3)
_BY_MODEL_TYPE: dict[str, FamilySpec] = {t: spec for spec in FAMILY_SPECS for t in spec.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))


def family_for(model_or_config: Any) -> FamilySpec:
    """The :class:`FamilySpec` of a transformers model or config (a ``PreTrainedModel`` or ``PretrainedConfig``).

    Raises ``ValueError`` naming the supported model types when the model type is neither registered nor
    loadable by ``AutoModelForImageTextToText``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is not None:
        return spec
    if not _is_image_text_to_text(model_type):
        raise ValueError(
            f"model type {model_type!r} is not a supported vision-language model; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}, or any other model type that transformers' "
            "AutoModelForImageTextToText loads"
        )
    model = model_or_config if model_or_config is not config else _meta_model(config)
    return _generic_spec(model, model_type)


def _is_image_text_to_text(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _meta_model(config: Any) -> Any:
    """The model of ``config`` built on the meta device: its module names, without allocating weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


_PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger", "projector")


def _generic_spec(model: Any, model_type: str) -> FamilySpec:
    import torch

    module_names = {id(module): name for name, module in model.named_modules()}
    decoder = model.get_decoder()
    lm_prefix = module_names.get(id(decoder), "")
    if not lm_prefix:
        raise ValueError(
            f"cannot find the language model inside {type(model).__name__} (model type {model_type!r}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    vision = model.get_encoder(modality="image")
    vision_prefix = module_names.get(id(vision), "") if vision is not model else ""
    candidates = [
        name
        for name in module_names.values()
        if name.rsplit(".", 1)[-1] in _PROJECTOR_NAMES and not _under(name, (lm_prefix,))
    ]
    # Keep the outermost match only (a `merger` inside a `connector` is part of it).
    projector_prefixes = tuple(
        name for name in candidates if not any(name != other and _under(name, (other,)) for other in candidates)
    )
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and _under(name, (lm_prefix,))
        }
    )
    return FamilySpec(
        name=f"generic:{model_type}",
        model_types=(model_type,),
        language_model_prefix=lm_prefix,
        vision_tower_prefixes=(vision_prefix,) if vision_prefix else (),
        projector_prefixes=projector_prefixes,
        lora_leaf_names=tuple(leaves),
        model_input_names=("pixel_values",),
        notes=(
            "generic fallback read off the model: LoRA on every Linear layer of the language model; extra "
            "inputs, 4D mask and position_ids support are not verified for this model type"
        ),
    )
