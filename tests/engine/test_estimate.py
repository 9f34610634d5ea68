"""The estimate before launch (dama_engine.training.estimate): its counts against a loaded model, its steps and
tokens against the trainer's, and its memory model against the peaks measured on an H100 (docs/PERFORMANCE.md).
The CPU side of the memory check (measured tensor bytes of real steps) is ``benchmarks/estimate_memory.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.train_workloads import LLAVA7B
from dama_engine.config import parse_config
from dama_engine.data import load_and_validate
from dama_engine.forward import PairEncoder
from dama_engine.models import build_tiny_model, load_model, load_processor, make_trainable
from dama_engine.proving import make_demo_dataset
from dama_engine.training import estimate_training
from dama_engine.training.estimate import (
    GIB,
    ModelCounts,
    PairLengths,
    Setup,
    count_model,
    memory_parts,
    peak_bytes,
    training_time,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("estimate")
    model = build_tiny_model("llava", root / "llava")
    demo = make_demo_dataset(root / "demo", n_train=40, n_eval=0, n_generative=0)
    return model, demo.train


def _values(model: Path, train: Path, **optim: object) -> dict[str, object]:
    return {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(train)},
        "optim": {"batch_size": 4, **optim},
    }


@pytest.mark.parametrize(
    "lora", [{"enabled": True}, {"enabled": True, "train_projector": True}, {"enabled": False}], ids=str
)
def test_counts_match_the_model_the_trainer_builds(tiny: tuple[Path, Path], lora: dict[str, object]) -> None:
    config = parse_config({**_values(*tiny), "lora": lora})
    counts = count_model(config)
    model = make_trainable(load_model(config.model, dtype=torch.float32), config.lora)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.language.layers == model.config.get_text_config().num_hidden_layers
    assert counts.lora_per_layer == (7 if config.lora.enabled else 0)  # q k v o gate up down


def test_rows_steps_and_tokens_are_the_trainers(tiny: tuple[Path, Path]) -> None:
    model, train = tiny
    config = parse_config(_values(model, train, epochs=3, grad_accumulation=2))
    estimate = estimate_training(config, world_size=2)
    rows, _ = load_and_validate(train)
    assert estimate["rows"] == estimate["rows_measured"] == len(rows) == 40
    assert estimate["steps"] == 3 * ((40 // (4 * 2)) // 2)  # epochs x whole steps of 4 pairs x 2 ranks x 2 micro
    encoder = PairEncoder(load_processor(config.model), max_length=config.data.max_length)
    packed = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in map(encoder.encode, rows)]
    assert estimate["tokens"]["layout"] == "packed"
    assert estimate["tokens"]["per_pair_max"] == max(packed)
    assert estimate["tokens"]["per_pair_mean"] == pytest.approx(sum(packed) / len(packed), abs=0.05)
    assert estimate["fits"] is None and estimate["advice"] == [] and estimate["time"] is None


def test_a_run_that_does_not_fit_gets_advice_that_fits(tiny: tuple[Path, Path]) -> None:
    config = parse_config(_values(*tiny, gradient_checkpointing=False))
    roomy = estimate_training(config, gpu_memory_gib=80, gpu_kind="h100")
    assert roomy["fits"] is True and roomy["advice"] == []
    assert roomy["time"]["gpu_kind"] == "H100" and roomy["time"]["pairs_per_s"] > 0
    options = {(o["gradient_checkpointing"], o["batch_size"], o["world_size"]): o for o in roomy["options"]}
    assert options[(True, 4, 1)]["peak_gib"] < options[(False, 4, 1)]["peak_gib"]
    assert options[(True, 4, 2)]["strategy"] == "fsdp"
    # Between the checkpointed peak and the plain one: only turning checkpointing on (or sharding) fits.
    limit = (options[(True, 4, 1)]["peak_gib"] + options[(False, 4, 1)]["peak_gib"]) / 2
    tight = estimate_training(config, gpu_memory_gib=limit)
    assert tight["fits"] is False and tight["memory"]["peak_gib"] > limit
    assert any("gradient_checkpointing on" in line for line in tight["advice"]), tight["advice"]
    hopeless = estimate_training(config, gpu_memory_gib=1e-6)
    assert hopeless["fits"] is False and hopeless["advice"][0].startswith("no setting tried fits")


# LLaVA-1.5-7B as the H100 runs built it (benchmarks/train_workloads.py LLAVA7B): one 336 px image (576 tokens) and a
# 20-word prompt (597 tokens in all), 150-word answers (152 tokens each), LoRA r64 on every language-model linear
# layer, no dropout, bf16 (shared/PERFORMANCE.md).
H100_PEAKS_GIB = [
    # (layout, compiled, checkpointing, batch, measured peak) from docs/PERFORMANCE.md (2026-11-26)
    ("packed", True, False, 8, 50.90),
    ("packed", True, False, 4, 31.39),
    ("packed", True, True, 12, 21.19),
    ("packed", True, True, 8, 19.12),
    ("packed", False, False, 4, 38.27),
    ("packed", False, True, 8, 19.52),
    ("two_rows", False, False, 4, 55.94),
    ("two_rows", False, True, 8, 22.50),
    ("model_logits", False, False, 4, 55.94),
    ("model_logits", False, True, 8, 22.50),
]


@pytest.fixture(scope="module")
def llava7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the config (no weights) of the benchmark's LLaVA-1.5-7B workload."""
    folder = tmp_path_factory.mktemp("llava7b")
    _, config = LLAVA7B.processor_and_config()
    config.save_pretrained(folder)
    return folder


def _llava7b(folder: Path, layout: str = "auto") -> tuple[ModelCounts, PairLengths]:
    """Its counts with LoRA r64 on every language-model linear layer, no dropout, and its pairs' lengths."""
    config = parse_config(
        {
            "model": {"name_or_path": str(folder)},
            "data": {"train": "unused.jsonl"},
            "lora": {"r": 64, "alpha": 16, "dropout": 0.0},
            "optim": {"pair_forward": layout},
        }
    )
    lengths = PairLengths(
        rows=1000, measured=1000, over_length=0, packed=[901], two_rows=[1498], answers=[304], image_tokens=576
    )
    return count_model(config), lengths


@pytest.mark.parametrize(("layout", "compiled", "checkpointing", "batch", "measured"), H100_PEAKS_GIB)
def test_the_memory_model_is_within_20_percent_of_the_h100_peaks(
    llava7b: Path, layout: str, compiled: bool, checkpointing: bool, batch: int, measured: float
) -> None:
    counts, lengths = _llava7b(llava7b, layout)
    assert counts.trainable == 32 * 64 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert 7.0e9 < counts.total - counts.trainable < 7.1e9  # LLaVA-1.5-7B: 7.06 B
    assert 6.7e9 < counts.language_model < 6.8e9  # 6.74 B with its embeddings and head
    parts = memory_parts(
        counts, lengths, Setup("ddp", checkpointing, batch, 1), bf16=True, lora=True, compiled=compiled
    )
    estimated = peak_bytes(parts) / GIB
    assert abs(estimated / measured - 1) <= 0.2, (estimated, measured, {k: v / GIB for k, v in parts.items()})


def test_a_starting_adapter_brings_its_rank(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, train = tiny
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": r".*language_model.*\.q_proj"}))
    config = parse_config(
        {**_values(model, train), "model": {"name_or_path": str(model), "init_adapter": str(adapter)}}
    )
    counts = count_model(config)
    assert counts.lora_r == 4 and counts.lora_per_layer == 1


# Pairs per second the H100 measured for the same workload (docs/PERFORMANCE.md), by (compiled, checkpointing).
H100_PAIRS_PER_S = [(True, False, 17.056), (True, True, 11.696), (False, False, 10.117), (False, True, 7.347)]


@pytest.mark.parametrize(("compiled", "checkpointing", "measured"), H100_PAIRS_PER_S)
def test_the_time_model_gives_the_h100_throughput(
    llava7b: Path, compiled: bool, checkpointing: bool, measured: float
) -> None:
    """The utilisation table comes from these runs, so this checks the FLOP arithmetic against the benchmark's."""
    counts, lengths = _llava7b(llava7b)
    setup = Setup("ddp", checkpointing, 8, 1)
    time = training_time(counts, lengths, "h100", 8000, 1, lora=True, wanted=setup, compiled=compiled)
    assert time is not None and abs(time["pairs_per_s"] / measured - 1) <= 0.1, (time, measured)
    assert (
        training_time(counts, lengths, "a-card-nobody-measured", 8000, 1, lora=True, wanted=setup, compiled=True)
        is None
    )
