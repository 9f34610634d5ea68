"""``bench_train.py``'s workloads: the model and data shapes, the pairs, and the state of one child's run.

The model shapes are the engine's tiny LLaVA resized (:mod:`train_shapes`); the data are random single-token
words and one flat-coloured image per pair, the same pairs for the engine, TRL and the hardness scorer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from benchmarks.train_measure import allocated_bytes, deadline, free_device
from benchmarks.train_shapes import load_tiny_llava, random_model, resize_config, resize_processor
from dama_engine.config import LoraSection
from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, TextPart
from dama_engine.forward.batching import PairBatch, PairEncoder, collate_pairs
from dama_engine.forward.compiling import compile_decoder_layers, eager
from dama_engine.models.families import family_for
from dama_engine.models.loading import make_trainable

LORA = LoraSection(r=64, alpha=16, dropout=0.0)


@dataclass(frozen=True)
class Workload:
    """Model shape, data shape and the configurations to time, in priority order (the budget cuts the tail).

    ``vision`` and ``text`` override the vision tower's and the language model's config of the engine's tiny
    LLaVA (empty: its own sizes); the images are ``image_size`` px square in 14 px patches.
    """

    name: str
    vision: dict[str, Any]
    text: dict[str, Any]
    clip_vision: dict[str, Any]
    clip_text: dict[str, Any]
    clip_projection: int
    image_size: int
    prompt_words: int
    answer_words: int
    warmup: int
    steps: int
    main_grid: tuple[tuple[bool, int], ...]  # (gradient checkpointing, pairs per step)
    trl_grid: tuple[tuple[bool, int], ...]
    trl_extra: tuple[tuple[bool, int], ...]  # TRL runs after everything else, if the budget allows
    ref_pairs: int
    hardness_pairs: int
    budget_s: float
    guess_config_s: float
    guess_trl_s: float

    def processor_and_config(self) -> tuple[Any, Any]:
        """The engine's tiny LLaVA processor, and its model config resized to this workload."""
        processor, config = load_tiny_llava()
        resize_processor(processor, self.image_size)
        return processor, resize_config(config, vision=self.vision, text=self.text, image_size=self.image_size)


TINY = Workload(
    name="tiny",
    # The engine's tiny LLaVA as it is built (hidden size 64, two layers in each tower).
    vision={},
    text={},
    clip_vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    clip_text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    clip_projection=32,
    # The sequence shape of the 7B workload (576 image tokens, 20-word prompt, 150-word answers) on a tiny model.
    image_size=336,
    prompt_words=20,
    answer_words=150,
    warmup=1,
    steps=6,
    main_grid=((False, 4), (True, 4)),
    trl_grid=((True, 4),),
    trl_extra=((False, 4),),
    ref_pairs=16,
    hardness_pairs=16,
    budget_s=240.0,
    guess_config_s=5.0,
    guess_trl_s=30.0,
)
LLAVA7B = Workload(
    name="llava7b",
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 and Llama-7B (vocabulary 32064), as shared/bench/trl_anchor.py.
    vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    text={
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
    },
    clip_vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    clip_text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    clip_projection=768,
    image_size=336,
    prompt_words=20,
    answer_words=150,
    warmup=2,
    steps=4,
    main_grid=((False, 4), (True, 8)),
    trl_grid=((True, 8),),
    trl_extra=((True, 4),),
    ref_pairs=32,
    hardness_pairs=64,
    budget_s=360.0,
    guess_config_s=20.0,
    guess_trl_s=30.0,  # trl/gc_on/b8 took 29 s in all (trainer set-up included) on an H100, b4 less
)


def _png(colour: tuple[int, int, int], size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Data:
    """The same pairs for the engine (rows), TRL (conversational dicts) and the hardness scorer."""

    rows: list[PreferenceRow]
    trl_rows: list[dict[str, Any]]
    hardness_rows: list[PreferenceRow]
    reference: torch.Tensor  # (N, 2): cached reference log-probs stand-ins
    hardness: torch.Tensor  # (N,)


def single_token_words(tokenizer: Any) -> list[str]:
    """Words the tokenizer keeps whole after a space (one token each), so text length maps to token length."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        text = tokenizer.convert_tokens_to_string([token])
        if text.startswith(" ") and text[1:].isalpha() and tokenizer.tokenize(text) == [token]:
            words.append(text[1:])
    return words


def build_data(workload: Workload, words: list[str], n_pairs: int) -> Data:
    rng = random.Random(0)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    def punctuated(text: str) -> str:
        # Real answers hold several sentences, and the hardness scorer scores each: a full stop every 15 words.
        parts = text.split()
        return ". ".join(" ".join(parts[i : i + 15]) for i in range(0, len(parts), 15)) + "."

    rows, trl_rows, hardness_rows = [], [], []
    for i in range(n_pairs):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        png = _png(colour, workload.image_size)
        question, chosen, rejected = (
            sentence(workload.prompt_words),
            sentence(workload.answer_words),
            sentence(workload.answer_words),
        )
        prompt = (Message(role="user", content=(ImagePart(), TextPart(question))),)
        image = ImageSource(data=png)
        rows.append(PreferenceRow(row_id=str(i), prompt=prompt, chosen=chosen, rejected=rejected, images=(image,)))
        hardness_rows.append(
            PreferenceRow(
                row_id=str(i), prompt=prompt, chosen=punctuated(chosen), rejected=punctuated(rejected), images=(image,)
            )
        )
        trl_rows.append(
            {
                "images": [Image.open(io.BytesIO(png)).convert("RGB")],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            }
        )
    generator = torch.Generator().manual_seed(1)
    # Summed log-probs of random weights are about -log(V) per token: stand-ins of that size.
    scale = workload.answer_words * 8.0
    reference = -scale * (1 + 0.05 * torch.rand(n_pairs, 2, generator=generator))
    hardness = torch.randn(n_pairs, generator=generator)
    return Data(rows=rows, trl_rows=trl_rows, hardness_rows=hardness_rows, reference=reference, hardness=hardness)


@dataclass
class Run:
    args: argparse.Namespace
    workload: Workload
    device: torch.device
    dtype: torch.dtype
    processor: Any
    model_config: Any  # the workload's model shape (Workload.processor_and_config)
    data: Data
    started: float
    peft_model: Any = None
    matmul_tflops: float | None = None
    deadline_unix: float | None = None  # set by the parent for a child: the run's end on the wall clock
    resident_bytes: int = 0  # device memory that lives across configurations (the engine model, encoded batches)
    restart: bool = False  # a configuration ran out of memory: finish this child, the parent starts a fresh one
    records: list[dict[str, Any]] = field(default_factory=list)
    step_seconds: dict[tuple[bool, int], float] = field(default_factory=dict)
    batch_cache: dict[int, tuple[list[PairBatch], float]] = field(default_factory=dict)
    lm_params: int = 0
    vision_params: int = 0
    vision_tokens: int = 0
    compiled_layers: int = 0  # decoder layers compiled in place (dama_engine.forward.compiling), once per child

    @property
    def left_s(self) -> float:
        if self.deadline_unix is not None:
            return self.deadline_unix - time.time()
        return self.args.budget_s - (time.perf_counter() - self.started)

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if self.args.out:
            with open(self.args.out, "a") as handle:
                handle.write(line + "\n")

    def attempt(self, name: str, guess_s: float, body: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one configuration under the budget; print its JSON line, or an error / skipped line."""
        reserve = 3.0  # for the table
        if self.left_s - reserve < guess_s:
            self.emit({"config": name, "skipped": "budget", "left_s": round(self.left_s, 1), "needs_s": guess_s})
            return None
        start = time.perf_counter()
        try:
            with deadline(self.left_s - reserve):
                record = body()
        except Exception as error:
            if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
                self.restart = True
            self.emit(
                {
                    "config": name,
                    "error": f"{type(error).__name__}: {error}"[:500],
                    "trace": traceback.format_exc(limit=3)[-800:],
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            record = None
        finally:
            # The exception (and the frames, tensors and graphs its traceback held) is gone by now.
            free_device(self.device)
        if record is not None:
            record = {"config": name, **record, "seconds": round(time.perf_counter() - start, 1)}
            self.emit(record)
        return record

    # ---- data ---------------------------------------------------------------------------------------------

    def batches(self, size: int) -> tuple[list[PairBatch], float]:
        """Two distinct pre-encoded batches of ``size`` pairs on the device, and the encoding pairs/s."""
        if size not in self.batch_cache:
            encoder = PairEncoder(self.processor, max_length=4096)
            pad = self.processor.tokenizer.pad_token_id
            built = []
            start = time.perf_counter()
            for b in range(2):
                pairs = [encoder.encode(self.data.rows[i], i) for i in range(b * size, (b + 1) * size)]
                built.append(collate_pairs(pairs, pad))
            encode_pairs_per_s = 2 * size / (time.perf_counter() - start)
            before = allocated_bytes(self.device)
            self.batch_cache[size] = ([batch.to(self.device) for batch in built], encode_pairs_per_s)
            self.resident_bytes += allocated_bytes(self.device) - before
        return self.batch_cache[size]

    # ---- the engine's model ---------------------------------------------------------------------------------

    def build_model(self) -> Any:
        """A fresh random-weight model of the workload's shape, in the run's dtype, on its device."""
        return random_model(self.model_config, self.device, self.dtype)

    def engine_model(self) -> Any:
        """The LoRA-wrapped model the engine's configurations share in this process (built on first use)."""
        if self.peft_model is None:
            free_device(self.device)
            before = allocated_bytes(self.device)
            model = self.build_model()
            self.lm_params, self.vision_params = count_params(model)
            self.peft_model = make_trainable(model, LORA)
            del model
            free_device(self.device)
            self.resident_bytes += allocated_bytes(self.device) - before
        return self.peft_model

    def layers(self, compiled: bool) -> contextlib.AbstractContextManager[Any]:
        """Run the block with the decoder layers compiled (compiling them on first use) or eager.

        Compiling is in place and lasts for the child; the eager configurations after it run under
        ``torch.compiler.set_stance("force_eager")``, so both can be timed on the one model.
        """
        if compiled:
            if not self.compiled_layers:
                self.compiled_layers = compile_decoder_layers(self.engine_model(), "layers", self.device)
            return contextlib.nullcontext()
        return eager() if self.compiled_layers else contextlib.nullcontext()

    def drop_engine_model(self) -> None:
        """Release the engine's model and batches (before TRL, which builds and wraps a model of its own)."""
        self.peft_model = None
        self.compiled_layers = 0
        self.batch_cache.clear()
        free_device(self.device)
        self.resident_bytes = allocated_bytes(self.device)

    def leaked_bytes(self) -> int:
        """Device memory still allocated after a configuration beyond what is meant to live across them."""
        free_device(self.device)
        return allocated_bytes(self.device) - self.resident_bytes

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        # As the trainer: bf16 autocast on a GPU (peft keeps LoRA weights in float32), nothing on a CPU.
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- FLOPs ----------------------------------------------------------------------------------------------

    def flops(self, *, tokens: int, images: int, passes: int) -> float:
        return 2.0 * self.lm_params * tokens * passes + 2.0 * self.vision_params * self.vision_tokens * images

    def rates(self, *, median_s: float, pairs: int, flops: float) -> dict[str, Any]:
        tflops = flops / median_s / 1e12
        return {
            "pairs_per_s": round(pairs / median_s, 3),
            "flops_per_step": float(f"{flops:.4g}"),
            "tflops": round(tflops, 2),
            "mfu": round(tflops / self.matmul_tflops, 4) if self.matmul_tflops else None,
        }


def count_params(model: Any) -> tuple[int, int]:
    """(language model + head without the input embedding, vision tower + projector) parameter counts."""
    family = family_for(model)
    lm, vision = 0, 0
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            continue
        is_head = name.removeprefix("base_model.model.").startswith("lm_head")
        if is_head or (family.is_language_model_param(name) and "embed_tokens" not in name):
            lm += parameter.numel()
        elif family.is_vision_tower_param(name) or family.is_projector_param(name):
            vision += parameter.numel()
    return lm, vision
