"""The tiny checkpoints load and run like real ones, and the family registry puts LoRA on the language model only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig, PaliGemmaConfig

from dama_engine.models.families import SUPPORTED_MODEL_TYPES, family_for
from dama_engine.models.tiny import BASE_CORPUS, FAMILIES, build_tiny_model

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square on a white background."}]},
]
# What each family's chat template renders for MESSAGES, before the processor expands the image placeholder.
EXPECTED_PROMPTS = {
    "llava": "USER: <image>\nWhat is in the image? ASSISTANT: A red square on a white background. ",
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
        "<|im_start|>assistant\nA red square on a white background.<|im_end|>\n"
    ),
    "idefics3": (
        "<|im_start|>User:<image>What is in the image?<end_of_utterance>\n"
        "Assistant: A red square on a white background.<end_of_utterance>\n"
    ),
}
GENERATION_PROMPT_ENDINGS = {"llava": "ASSISTANT:", "qwen2_vl": "<|im_start|>assistant\n", "idefics3": "Assistant:"}
IMAGE_PLACEHOLDERS = {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "idefics3": "<image>"}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    family: str = request.param
    return family, build_tiny_model(family, tmp_path_factory.mktemp(family) / "model", seed=0)


def _image() -> Image.Image:
    # Not square, so Qwen2-VL's aspect-preserving resize is exercised.
    return Image.new("RGB", (40, 30), (200, 20, 20))


def _batch(processor: Any) -> Any:
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    return processor(text=text, images=[_image()], return_tensors="pt")


def _expected_image_tokens(family: str, model: Any, batch: Any) -> int:
    config = model.config
    if family == "llava":
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2  # the CLS token is dropped ("default" strategy)
    if family == "qwen2_vl":
        merge = config.vision_config.spatial_merge_size
        return int(batch["image_grid_thw"].prod(dim=-1).sum()) // merge**2
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2


def test_chat_template_renders_like_the_real_model(tiny: tuple[str, Path]) -> None:
    family, path = tiny
    processor = AutoProcessor.from_pretrained(path)
    assert processor.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_PROMPTS[family]
    prompt = processor.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(GENERATION_PROMPT_ENDINGS[family])
    assert prompt.count(IMAGE_PLACEHOLDERS[family]) == 1


def test_config_token_ids_match_the_tokenizer(tiny: tuple[str, Path]) -> None:
    family, path = tiny
    model = AutoModelForImageTextToText.from_pretrained(path)
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    text_config = model.config.text_config
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDERS[family])
    assert text_config.vocab_size == len(tokenizer)
    assert text_config.pad_token_id == tokenizer.pad_token_id is not None
    assert text_config.eos_token_id == tokenizer.eos_token_id is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert 1000 <= len(tokenizer) <= 2000


def test_forward_with_one_image_gives_a_finite_loss(tiny: tuple[str, Path]) -> None:
    family, path = tiny
    model = AutoModelForImageTextToText.from_pretrained(path)
    batch = _batch(AutoProcessor.from_pretrained(path))

    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == _expected_image_tokens(family, model, batch)
    assert 0 < image_tokens <= 16

    labels = batch["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    output = model(**batch, labels=labels)
    assert torch.isfinite(output.loss)
    assert output.logits.shape[-1] == len(AutoProcessor.from_pretrained(path).tokenizer)


def test_lora_targets_hit_only_the_language_model(tiny: tuple[str, Path]) -> None:
    family, path = tiny
    model = AutoModelForImageTextToText.from_pretrained(path)
    spec = family_for(model)
    assert spec.name == family
    assert family_for(model.config) is spec

    targets = spec.lora_target_modules(model)
    assert len(targets) == 7 * model.config.text_config.num_hidden_layers
    names = [name for name, _ in model.named_parameters()]
    assert any(spec.is_vision_tower_param(name) for name in names)
    assert any(spec.is_projector_param(name) for name in names)
    assert not any(spec.is_vision_tower_param(name) and spec.is_projector_param(name) for name in names)

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=spec.lora_target_regex))
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and not name.endswith(("lora_A", "lora_B"))
    }
    assert wrapped == set(targets)
    for name in wrapped:
        assert spec.is_language_model_param(name)
        assert not spec.is_vision_tower_param(name)
        assert not spec.is_projector_param(name)
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name and spec.is_language_model_param(name) for name in trainable)


def test_same_seed_gives_identical_weights(tiny: tuple[str, Path], tmp_path: Path) -> None:
    family, path = tiny
    first = load_file(path / "model.safetensors")
    again = load_file(build_tiny_model(family, tmp_path / "again", seed=0) / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert (path / "tokenizer.json").read_bytes() == (tmp_path / "again" / "tokenizer.json").read_bytes()

    other = load_file(build_tiny_model(family, tmp_path / "other", seed=1) / "model.safetensors")
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_corpus_words_become_few_tokens(tmp_path: Path) -> None:
    word = "Zorbulate"
    assert not any(word in line for line in BASE_CORPUS)
    plain = AutoProcessor.from_pretrained(build_tiny_model("llava", tmp_path / "plain")).tokenizer
    taught = AutoProcessor.from_pretrained(
        build_tiny_model("llava", tmp_path / "taught", corpus=[f"{word} the image."] * 3)
    ).tokenizer
    assert len(taught.tokenize(word)) < len(plain.tokenize(word))


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llava, qwen2_vl, idefics3"):
        build_tiny_model("blip", tmp_path)


def test_unsupported_model_type_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="not a supported vision-language model") as error:
        family_for(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    assert all(model_type in str(error.value) for model_type in SUPPORTED_MODEL_TYPES)


def test_generic_fallback_reads_the_layout_off_the_model() -> None:
    config = PaliGemmaConfig(
        text_config={"model_type": "gemma", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
    )  # fmt: skip
    spec = family_for(config)
    assert spec.name == "generic:paligemma"
    assert spec.language_model_prefix == "model.language_model"
    assert spec.vision_tower_prefixes == ("model.vision_tower",)
    assert spec.projector_prefixes == ("model.multi_modal_projector",)
    assert set(spec.lora_leaf_names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
