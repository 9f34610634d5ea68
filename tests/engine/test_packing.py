"""The fast pair forwards (dama_engine.forward.packing) against the plain path: same log-probs, loss and LoRA gradients.

Float32 on the CPU with the tiny models of every family, on pairs whose prompts (text and image size) and answers
differ in length within one batch, so padding, restarts and the first rejected token are all exercised.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.config import LoraSection
from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, TextPart
from dama_engine.forward.batching import PairBatch, PairEncoder, collate_pairs
from dama_engine.forward.logprobs import pair_log_probs
from dama_engine.forward.packing import configured_pair_forward, pack_pairs, resolve_pair_forward, set_pair_forward
from dama_engine.models.families import FamilySpec
from dama_engine.models.loading import make_trainable
from dama_engine.objective.loss import ObjectiveConfig, preference_loss

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("llava", "qwen2_vl", "idefics3")


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(index: int, question: str, chosen: str, rejected: str, size: tuple[int, int]) -> PreferenceRow:
    prompt = (Message(role="user", content=(ImagePart(), TextPart(question))),)
    colour = (40 * index % 256, 200, 90)
    return PreferenceRow(
        row_id=str(index),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        images=(ImageSource(data=_png(colour, size)),),
        row_number=index + 1,
    )


@pytest.fixture
def uneven_rows() -> list[PreferenceRow]:
    """Prompts, image sizes (Qwen2-VL's token count follows the size) and answers of different lengths."""
    return [
        _row(0, "What is in the image?", "A red circle.", "A blue square and a green star on a white table.", (40, 30)),
        _row(
            1,
            "Look at the photo and answer the question. Which animal is on the left?",
            "Two yellow triangles on a white background, next to a small black cat.",
            "A cat.",
            (90, 60),
        ),
        _row(2, "Describe the image in detail.", "A green square.", "A green circle.", (56, 56)),
    ]


def _lora_model(path: Path, attn: str | None = None) -> Any:
    kwargs = {"attn_implementation": attn} if attn else {}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    model = make_trainable(model, LoraSection(r=4, alpha=8, dropout=0.0))
    # peft starts B at zero; random B makes every LoRA matrix (A too) get a gradient.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.train()


def _loss_and_grads(model: Any, batch: PairBatch, forward: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    chosen, rejected = pair_log_probs(model, batch, forward=forward)
    reference = torch.linspace(-60.0, -40.0, chosen.shape[0])
    output = preference_loss(
        chosen, rejected, reference, reference - 3.0, config=ObjectiveConfig(method="dpo", beta=0.1)
    )
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return torch.stack([chosen.detach(), rejected.detach()]), output.loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_paths_equal_the_plain_path(tiny_models, uneven_rows: list[PreferenceRow], family: str) -> None:
    processor = AutoProcessor.from_pretrained(tiny_models[family])
    model = _lora_model(tiny_models[family])
    pairs = [PairEncoder(processor, max_length=512).encode(row, i) for i, row in enumerate(uneven_rows)]
    assert len({len(p.prompt_ids) for p in pairs}) == len(pairs)  # every prompt has its own length
    batch = collate_pairs(pairs, processor.tokenizer.pad_token_id)
    assert resolve_pair_forward(model, "auto") == "packed"

    logps, loss, grads = _loss_and_grads(model, batch, "model_logits")
    assert len(grads) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in each of 2 layers
    for forward in ("two_rows", "packed"):
        fast_logps, fast_loss, fast_grads = _loss_and_grads(model, batch, forward)
        torch.testing.assert_close(fast_logps, logps, rtol=0, atol=1e-4, msg=f"{forward} log-probs")
        torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6, msg=f"{forward} loss")
        assert fast_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"{forward} {name}")


def test_packed_with_eager_attention_uses_an_additive_mask(tiny_models, uneven_rows: list[PreferenceRow]) -> None:
    processor = AutoProcessor.from_pretrained(tiny_models["llava"])
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"], attn_implementation="eager").eval()
    pairs = [PairEncoder(processor, max_length=512).encode(row, i) for i, row in enumerate(uneven_rows)]
    batch = collate_pairs(pairs, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = torch.stack(pair_log_probs(model, batch, forward="model_logits"))
        packed = torch.stack(pair_log_probs(model, batch, forward="packed"))
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-4)


def test_packed_layout_by_hand() -> None:
    """Pair 0: prompt [5 6], chosen [7 8], rejected [9 10 11]; pair 1: prompt [5 6 6], chosen [7], rejected [9]."""
    pad = 0
    rows = [[5, 6, 7, 8], [5, 6, 6, 7], [5, 6, 9, 10, 11], [5, 6, 6, 9]]
    width = 5
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    answer_mask = torch.zeros(4, width, dtype=torch.bool)
    for b, (start, end) in enumerate([(2, 4), (3, 4), (2, 5), (3, 4)]):
        answer_mask[b, start:end] = True
    batch = PairBatch(
        indices=torch.tensor([0, 1]),
        input_ids=input_ids,
        attention_mask=(input_ids != pad).long(),
        answer_mask=answer_mask,
        first_answer=2,
        model_inputs={"pixel_values": torch.arange(2.0).repeat(2)},
        prompt_lengths=(2, 3),
        answer_lengths=(2, 1, 3, 1),
        pad_token_id=pad,
    )
    packed = pack_pairs(batch, pad_to_multiple_of=4)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 0], [5, 6, 6, 7, 9, 0, 0, 0]]
    # Rejected positions restart at the prompt's end; padding sits at 0.
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0], [0, 1, 2, 3, 3, 0, 0, 0]]
    # Each pair's vision tensors once.
    assert packed.model_inputs["pixel_values"].tolist() == [0.0, 1.0]
    allowed = packed.allowed[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # first rejected token: the prompt and itself, not the chosen answer
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # padding sees only itself (no empty row, no NaN)
    ]
    # Targets in packed order: chosen 7 8 from positions 1 2; rejected 9 from the last prompt position (1), then
    # 10 11 from 4 5; pair 1 (row offset 8): 7 from 10, 9 from 10 as well.
    assert packed.plan.source.tolist() == [1, 2, 1, 4, 5, 10, 10]
    assert packed.input_ids.reshape(-1)[packed.plan.target].tolist() == [7, 8, 9, 10, 11, 7, 9]
    assert packed.plan.segment.tolist() == [0, 0, 2, 2, 2, 1, 3]


def test_qwen2_vl_falls_back_to_two_rows_when_rope_index_fails(
    tiny_models, uneven_rows: list[PreferenceRow], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dama_engine.forward import packing

    processor = AutoProcessor.from_pretrained(tiny_models["qwen2_vl"])
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["qwen2_vl"]).eval()
    pairs = [PairEncoder(processor, max_length=512).encode(row, i) for i, row in enumerate(uneven_rows)]
    batch = collate_pairs(pairs, processor.tokenizer.pad_token_id)

    def other_signature(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("get_rope_index() got an unexpected keyword argument 'mm_token_type_ids'")

    # As with a transformers version whose get_rope_index takes other arguments than the packed path passes.
    monkeypatch.setattr(packing, "_mrope_position_ids", other_signature)
    monkeypatch.setattr(packing, "_warned", set())
    with torch.no_grad():
        plain = torch.stack(pair_log_probs(model, batch, forward="model_logits"))
        with pytest.warns(RuntimeWarning, match="two-row layout"):
            packed = torch.stack(pair_log_probs(model, batch, forward="packed"))
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-4)


def test_resolution_and_fallbacks(tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    from dama_engine.forward import packing

    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"])
    assert configured_pair_forward(model) == "auto"
    assert set_pair_forward(model, "two_rows") == "two_rows"
    assert configured_pair_forward(make_trainable(model, LoraSection(r=2))) == "two_rows"  # seen through peft
    with pytest.raises(ValueError, match="unknown"):
        resolve_pair_forward(model, "fastest")

    # Attention kernels that take no 4D mask: auto keeps two rows, an explicit 'packed' is refused up front.
    monkeypatch.setattr(packing, "_attention_implementation", lambda model: "flash_attention_2")
    assert resolve_pair_forward(model, "auto") == "two_rows"
    with pytest.raises(ValueError, match="flash_attention_2"):
        resolve_pair_forward(model, "packed")

    # A family read off an unknown model type keeps the model's own logits.
    generic = FamilySpec(
        name="generic:mystery",
        model_types=("mystery",),
        language_model_prefix="model.language_model",
        vision_tower_prefixes=(),
        projector_prefixes=(),
    )
    monkeypatch.setattr(packing, "_family", lambda model: generic)
    assert resolve_pair_forward(model, "auto") == "model_logits"
    with pytest.raises(ValueError, match="model_logits"):
        resolve_pair_forward(model, "two_rows")


def test_bench_tiny_smoke() -> None:
    """A very short ``benchmarks/bench_train.py --tiny`` run prints one JSON line per configuration."""
    has_trl = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    if not has_trl:
        print("trl/datasets not importable: the smoke run skips TRL (pip install -e '.[bench]' to include it)")
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train.py"),
        "--tiny",
        "--quick",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--methods",
        "dpo",
        "--ref-pairs",
        "4",
        "--hardness-pairs",
        "4",
        "--forwards",
        "packed,two_rows",
        "--budget-s",
        "100",
        "--threads",
        "1",
    ]
    if not has_trl:
        command.append("--no-trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"')]
    names = {record["config"] for record in records}
    assert {"env", "reference/packed", "reference/two_rows", "hardness", "summary"} <= names, names
    assert next(r for r in records if r["config"] == "env")["threads"] == 1  # the deliberate count, reported
    assert all("error" not in record and "skipped" not in record for record in records), records
    engine = [r for r in records if r.get("kind") == "engine"]
    assert {(r["forward"], r["method"]) for r in engine} == {("packed", "dpo"), ("two_rows", "dpo")}
    assert all(r["pairs_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in engine)
    assert any(r.get("kind") == "trl" for r in records) == has_trl
    assert "ratio of pairs/s to TRL" in proc.stdout  # the table comes last
