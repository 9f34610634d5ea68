"""Merged export: base + LoRA folded into one plain transformers model gives the logits of base + adapter, for the
tiny model of every family (LLaVA, Qwen2-VL, Idefics3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.config import ModelSection
from dama_engine.models.families import family_for
from dama_engine.training.export import export_merged

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square on a white background."}]},
]


def _batch(processor: Any) -> Any:
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    return processor(text=text, images=[Image.new("RGB", (40, 30), (200, 20, 20))], return_tensors="pt")


def _random_adapter(base_path: Path, adapter_dir: Path) -> None:
    """A LoRA adapter whose B matrices are not zero (init_lora_weights=False), so merging changes the logits."""
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(base_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=family_for(base).lora_target_regex, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(adapter_dir)


def _logits(model: Any, batch: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_merged_logits_equal_base_plus_adapter(family: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    base_path = tiny_models[family]
    adapter_dir = tmp_path / "adapter"
    _random_adapter(base_path, adapter_dir)
    (adapter_dir / "README.md").write_text("---\nbase_model: x\n---\n# dama adapter\n\nTrained with DAMA.\n")

    merged_dir = export_merged(
        model=ModelSection(name_or_path=str(base_path)),
        adapter_dir=adapter_dir,
        output_dir=tmp_path / "merged",
        adapter_name="job_test",
        base_name=f"dama/tiny-{family}",
    )

    files = {path.name for path in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert not any(name.startswith("adapter_") for name in files)  # a plain model: nothing for peft to load
    card = (merged_dir / "README.md").read_text()
    assert card.startswith("---\nbase_model: dama/tiny-") and "Trained with DAMA." in card and card.count("---\n") == 2

    processor = AutoProcessor.from_pretrained(merged_dir)  # the processor files travel with the weights
    batch = _batch(processor)
    merged = _logits(AutoModelForImageTextToText.from_pretrained(merged_dir), batch)
    base_only = _logits(AutoModelForImageTextToText.from_pretrained(base_path), batch)
    with_adapter = _logits(
        PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_path), adapter_dir), batch
    )
    assert not torch.allclose(with_adapter, base_only, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)
