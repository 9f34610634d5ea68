"""Rows -> token ids -> batches -> summed answer log-probs, checked against transformers' own loss."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.data.rows import PreferenceRow
from dama_engine.forward.batching import EncodingError, PairEncoder, collate_pairs
from dama_engine.forward.logprobs import pair_log_probs, token_log_probs

FAMILIES = ("llava", "qwen2_vl", "idefics3")


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_shared_and_answers_follow_it(tiny_models, rows: list[PreferenceRow], family: str) -> None:
    processor = AutoProcessor.from_pretrained(tiny_models[family])
    encoder = PairEncoder(processor, max_length=512)
    pair = encoder.encode(rows[0], 0)
    # The answer ids decode to exactly what the chat template appends after the generation prompt.
    rendered = processor.apply_chat_template(rows[0].conversation(rows[0].chosen), tokenize=False)
    prompt = processor.apply_chat_template(rows[0].prompt_chat(), add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(prompt)
    decoded = processor.tokenizer.decode(pair.chosen_ids)
    assert decoded.startswith(rendered[len(prompt) :].rstrip())
    assert "A red circle." in decoded and "What is in the image?" in processor.tokenizer.decode(pair.prompt_ids)
    assert processor.tokenizer.eos_token_id in pair.chosen_ids
    # Image tokens were expanded inside the prompt.
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert pair.prompt_ids.count(image_token_id) > 1
    assert "pixel_values" in pair.vision


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_equal_transformers_loss(tiny_models, rows: list[PreferenceRow], family: str) -> None:
    """Summed answer log-prob of each sequence == -(HF mean token loss) x answer tokens, row by row."""
    processor = AutoProcessor.from_pretrained(tiny_models[family])
    model = AutoModelForImageTextToText.from_pretrained(tiny_models[family]).eval()
    encoder = PairEncoder(processor, max_length=512)
    pairs = [encoder.encode(row, i) for i, row in enumerate(rows)]
    batch = collate_pairs(pairs, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = pair_log_probs(model, batch)
        for i, pair in enumerate(pairs):
            for answer, got in ((pair.chosen_ids, chosen[i]), (pair.rejected_ids, rejected[i])):
                single = collate_pairs([pair], processor.tokenizer.pad_token_id)
                row = 0 if answer is pair.chosen_ids else 1
                labels = torch.full_like(single.input_ids[row : row + 1], -100)
                start = len(pair.prompt_ids)
                labels[0, start : start + len(answer)] = torch.tensor(answer)
                inputs = {k: v[: v.shape[0] // 2] for k, v in single.model_inputs.items()}
                out = model(
                    input_ids=single.input_ids[row : row + 1],
                    attention_mask=single.attention_mask[row : row + 1],
                    labels=labels,
                    **inputs,
                )
                expected = -out.loss.item() * len(answer)
                assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_token_log_probs_matches_log_softmax() -> None:
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_log_probs(logits.to(torch.bfloat16), targets), expected, atol=0.05, rtol=0)
    torch.testing.assert_close(token_log_probs(logits, targets), expected)


def test_over_long_rows_are_rejected_never_cut_in_the_prompt(tiny_models, rows: list[PreferenceRow]) -> None:
    processor = AutoProcessor.from_pretrained(tiny_models["llava"])
    prompt_len = len(PairEncoder(processor, max_length=512).encode(rows[1]).prompt_ids)
    with pytest.raises(EncodingError, match=r"chosen.*exceed max_length"):
        PairEncoder(processor, max_length=prompt_len + 2).encode(rows[1])
    cut = PairEncoder(processor, max_length=prompt_len + 2, truncate_answers=True).encode(rows[1])
    assert len(cut.prompt_ids) == prompt_len and len(cut.chosen_ids) == 2
    with pytest.raises(EncodingError, match=r"prompt.*image tokens"):
        PairEncoder(processor, max_length=prompt_len - 1, truncate_answers=True).encode(rows[1])
