"""Batched generation on the tiny models: batch equals one-by-one, determinism, length limits, base vs adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from pydantic import ValidationError
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.data.rows import ImageSource
from dama_engine.forward.generation import GenerationRequest, GenerationSettings, generate, generate_token_ids
from dama_engine.models.families import family_for
from tests.engine.conftest import make_row, png_bytes

MAX_NEW_TOKENS = 8


def _requests() -> list[GenerationRequest]:
    """Three prompts of different lengths, with images of different sizes (so left padding is exercised)."""
    return [
        GenerationRequest.from_prompt("Describe the image.", [Image.new("RGB", (40, 30), (220, 30, 30))]),
        GenerationRequest.from_prompt(
            "What is in this picture? Answer briefly, please.", [ImageSource(data=png_bytes((30, 170, 50), (64, 48)))]
        ),
        GenerationRequest.from_prompt("Shapes?", [Image.new("RGB", (32, 64), (30, 70, 220))]),
    ]


def _load(path: Path) -> tuple[Any, Any]:
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_greedy_batch_equals_one_by_one_and_repeats(tiny_models: dict[str, Path], family: str) -> None:
    model, processor = _load(tiny_models[family])
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    requests = _requests()
    batched = generate_token_ids(model, processor, requests, settings, batch_size=3)
    single = [generate_token_ids(model, processor, [request], settings)[0] for request in requests]
    assert batched == single
    assert generate_token_ids(model, processor, requests, settings, batch_size=2) == batched
    assert all(0 < len(ids) <= MAX_NEW_TOKENS for ids in batched)
    texts = generate(model, processor, requests, settings, batch_size=3)
    tokenizer = processor.tokenizer
    assert texts == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in batched]
    # The answer is new text only: the prompt is not echoed.
    assert not any("Describe the image." in text for text in texts)


def test_max_new_tokens_is_respected(tiny_models: dict[str, Path]) -> None:
    model, processor = _load(tiny_models["llava"])
    for limit in (1, 3):
        answers = generate_token_ids(model, processor, _requests(), GenerationSettings(max_new_tokens=limit))
        assert all(len(ids) <= limit for ids in answers)


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(tiny_models: dict[str, Path]) -> None:
    model, processor = _load(tiny_models["llava"])
    requests = _requests()
    sample = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=0.95, seed=1)
    state = torch.get_rng_state()
    first = generate_token_ids(model, processor, requests, sample)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_token_ids(model, processor, requests, sample) == first
    other_seed = generate_token_ids(model, processor, requests, sample.model_copy(update={"seed": 2}))
    assert other_seed != first
    greedy = generate_token_ids(model, processor, requests, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    assert greedy != first


def test_base_and_adapter(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A peft model generates with its adapter; disable_adapter() gives exactly the base model's answers."""
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    requests = _requests()
    base, processor = _load(tiny_models["llava"])
    base_answers = generate_token_ids(base, processor, requests, settings)

    model, _ = _load(tiny_models["llava"])
    # Random (not zero) LoRA B so the adapter changes the model from the start.
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=family_for(model).lora_target_regex, init_lora_weights=False)
    peft_model = get_peft_model(model, lora).eval()
    tuned_answers = generate_token_ids(peft_model, processor, requests, settings)
    with peft_model.disable_adapter():
        assert generate_token_ids(peft_model, processor, requests, settings) == base_answers
    assert tuned_answers != base_answers

    peft_model.save_pretrained(str(tmp_path / "adapter"))
    fresh, _ = _load(tiny_models["llava"])
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert generate_token_ids(reloaded, processor, requests, settings, batch_size=2) == tuned_answers


def test_request_from_a_preference_row(tiny_models: dict[str, Path]) -> None:
    model, processor = _load(tiny_models["qwen2_vl"])
    row = make_row(0, "A red circle.", "A blue square.")
    request = GenerationRequest.from_row(row)
    assert request.images == row.images
    [answer] = generate(model, processor, [request], GenerationSettings(max_new_tokens=4))
    assert isinstance(answer, str)


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError):
        GenerationSettings(temperature=-0.5)
    with pytest.raises(ValidationError):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValidationError):
        GenerationSettings.model_validate({"max_new_token": 5})
    assert not GenerationSettings().sampling
    assert GenerationSettings(temperature=0.7).sampling


def test_row_seeds_make_each_answer_independent_of_its_batch(tiny_models: dict[str, Path]) -> None:
    """Seeded rows: a request's answer depends on its seed only, not on its batch or its place in it."""
    model, processor = _load(tiny_models["llava"])
    requests = _requests() * 2
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=0.9)
    seeds = [11, 12, 13, 14, 15, 16]
    batched = generate_token_ids(model, processor, requests, settings, batch_size=6, row_seeds=seeds)
    single = [
        generate_token_ids(model, processor, [r], settings, row_seeds=[s])[0]
        for r, s in zip(requests, seeds, strict=True)
    ]
    assert batched == single
    assert generate_token_ids(model, processor, requests, settings, batch_size=4, row_seeds=seeds) == batched
    assert batched[0] != batched[3]  # the same prompt under another seed
    moved = generate_token_ids(model, processor, requests[3:] + requests[:3], settings, row_seeds=seeds[3:] + seeds[:3])
    assert moved == batched[3:] + batched[:3]
    with pytest.raises(ValueError, match="row_seeds"):
        generate_token_ids(model, processor, requests, GenerationSettings(), row_seeds=seeds)
    with pytest.raises(ValueError, match="row_seeds"):
        generate_token_ids(model, processor, requests, settings, row_seeds=seeds[:2])


def test_row_sampler_draws_by_inverse_cdf() -> None:
    """Worked by hand: probabilities (0.5, 0.25, 0.25, 0); u picks the first token whose cumulative mass exceeds u,
    never the zero-mass one; top_k=2 over (0.5, 0.3, 0.2) keeps the two likeliest and renormalises."""
    from dama_engine.forward.generation import _RowSampler

    class Fixed:
        def __init__(self, value: float) -> None:
            self.value = value

        def random(self) -> float:
            return self.value

    scores = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0]] * 4))
    sampler = _RowSampler(GenerationSettings(temperature=1.0), [0, 0, 0, 0])
    sampler.rngs = [Fixed(u) for u in (0.1, 0.6, 0.8, 0.999)]  # type: ignore[misc]
    chosen = sampler(torch.zeros(4, 1, dtype=torch.long), scores).argmax(dim=-1).tolist()
    assert chosen == [0, 1, 2, 2]
    top2 = _RowSampler(GenerationSettings(temperature=1.0, top_k=2), [0, 0])
    top2.rngs = [Fixed(u) for u in (0.6, 0.7)]  # type: ignore[misc]
    # Kept: 0.5 and 0.3 -> 0.625 and 0.375; u = 0.6 -> token 0, u = 0.7 -> token 1.
    uneven = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]] * 2))
    assert top2(torch.zeros(2, 1, dtype=torch.long), uneven).argmax(dim=-1).tolist() == [0, 1]
