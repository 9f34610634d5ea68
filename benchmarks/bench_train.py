"""Training-step benchmark: this engine's pair forwards and every DAMA method, against TRL's DPOTrainer.

One random-weight model shape, one data set, one LoRA configuration (r=64, alpha 16, every projection of the
language model, no dropout), the same batches for everyone. Prints one JSON line per configuration, then a table
of ratios to TRL measured in the same run.

Process isolation: the script (the parent) imports no model and touches no GPU; it runs the configurations in
child processes (``bench_train.py --only NAME,NAME,...``), each printing its JSON lines, and collects them. TRL
runs in children of its own; the engine's configurations share one child (one model, built once) and release
everything between configurations (optimizer, gradients, graphs, cached allocator blocks). A child that runs out
of memory, leaks device memory across a configuration, crashes or overruns is replaced by a fresh one for the
configurations left, so one failure cannot starve the rest of the run.

    python benchmarks/bench_train.py --tiny      # CPU smoke report, a minute or two; asserts nothing about speed
    python benchmarks/bench_train.py --llava7b   # GPU: the workload of shared/PERFORMANCE.md, about 3 minutes

What is timed (each configuration: ``--warmup`` steps, then the median of ``--steps`` synchronised steps):

* ``engine/<forward>/<method>/gc_<on|off>/b<N>``: the trainer's own step, ``dama_engine.training.step.train_step``, on
  pre-encoded batches (one micro-batch per step): forward under bf16 autocast (GPU), the objective with cached
  reference log-probs, backward, the state merge, gradient clipping, AdamW; metrics read back on the last timed
  step only (as ``run.log_every`` > 1 would). ``host_syncs_per_logging_step`` counts the host syncs of one more
  step (``dama_engine.training.host_syncs``). ``forward`` is a ``dama_engine.forward.packing.PairForward``:
  ``model_logits`` (the
  plain 2N-row layout with the model's own logits: the engine before the fast paths), ``two_rows`` (plain layout,
  answer-only head), ``packed`` (one row per pair). Encoding (image processor, tokenizer) is timed apart as
  ``encode_pairs_per_s``, as TRL's collation falls outside its step timer too.
* ``reference/<forward>``: the engine's reference pre-pass (adapter off, no grad), pairs/s. The trainer runs it once
  per data set and caches it; ``e2e_pairs_per_s`` amortises it over ``--epochs`` epochs:
  ``1 / (1 / step + 1 / (epochs * reference))``. TRL recomputes the reference inside every step.
* ``hardness``: DAMA's data-hardness pre-pass (``ClipHardnessScorer``) with a CLIP ViT-L/14-336-shaped random
  CLIPModel (``--llava7b``; a tiny CLIP with ``--tiny``), pairs/s.
* ``trl/gc_<on|off>/b<N>``: TRL's DPOTrainer as in shared/bench/trl_anchor.py (sigmoid DPO, reference = adapter
  off), timed by a step callback.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and the process's peak RSS (sampled) on a CPU.
TFLOP/s is an estimate of the matrix work executed: ``2 x (language-model parameters without the input
embedding) x tokens`` per pass (forward; backward to the inputs; the recomputation when checkpointing; TRL's
reference forward), plus the vision tower's forward per image; attention's quadratic part and LoRA are left out.
MFU divides it by a bf16 matrix product measured in the same run.

Each configuration runs in its own try/except (an error or OOM prints an ``error`` line and the run goes on); a
configuration that would not finish inside ``--budget-s`` is skipped with a ``skipped`` line. ``--only`` runs the
named configurations in this process (what the parent does per child; names as in the JSON lines, e.g.
``engine/packed/dama/gc_off/b4``, ``reference/packed``, ``agreement``, ``hardness``, ``trl/gc_on/b8``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout: the repository root goes on sys.path before the engine's imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

from dama_engine.config import LoraSection
from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, TextPart
from dama_engine.forward.batching import PairBatch, PairEncoder, collate_pairs
from dama_engine.forward.compiling import compile_decoder_layers, eager
from dama_engine.forward.logprobs import pair_log_probs
from dama_engine.forward.packing import set_pair_forward
from dama_engine.models.families import family_for
from dama_engine.models.loading import make_trainable
from dama_engine.objective.loss import PREFERENCE_METHODS, ObjectiveConfig, ObjectiveState
from dama_engine.threads import apply_threads
from dama_engine.training.host_syncs import HostSyncs, count_host_syncs
from dama_engine.training.step import StepSetup, train_step

GIB = 2**30
LORA = LoraSection(r=64, alpha=16, dropout=0.0)
TEMPLATE = (
    "{% for m in messages %}{% if m['role']=='user' %}USER: {% for c in m['content'] %}{% if c['type']=='image' %}"
    "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% else %}ASSISTANT: {% for c in m['content'] %}"
    "{{ c['text'] }} {% endfor %}</s> {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


# ---------------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Model shape, data shape and the configurations to time, in priority order (the budget cuts the tail)."""

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


TINY = Workload(
    name="tiny",
    vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    text={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
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


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


class OutOfBudget(Exception):
    """A configuration ran past the run's time budget."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`OutOfBudget` in the main thread once ``seconds`` have passed (checked between Python ops)."""
    if seconds <= 0:
        raise OutOfBudget("no time left")

    def expire(_signum: int, _frame: Any) -> None:
        raise OutOfBudget(f"over the budget after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory over a block: CUDA's max_memory_allocated, or the RSS sampled every 2 ms on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.start = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def gib(self) -> float:
        return round(self.peak / GIB, 3)

    def fields(self) -> dict[str, Any]:
        """``peak_mem_gib`` and its kind; on a CPU also the growth over the block (RSS never shrinks much)."""
        values: dict[str, Any] = {"peak_mem_gib": self.gib, "mem_kind": self.kind}
        if self.device.type != "cuda":
            values["rss_growth_gib"] = round((self.peak - self.start) / GIB, 3)
        return values


class SavedTensorBytes:
    """Bytes of the tensors autograd keeps for the backward pass of the forwards run under :meth:`hooks`.

    Parameters are left out. Deterministic on any device: it is the activation memory a path needs between
    forward and backward. Tensors inside checkpointed regions are recomputed, not kept, and are not counted.
    It is measured during a real training step (forward, then backward), not an extra forward.

    The pack hook returns a *detached alias* of the tensor, never the tensor itself: a saved output packed as
    itself makes its graph node hold the tensor that holds the node, a cycle through C++ that Python's garbage
    collector cannot see, so a graph that is never backpropagated is never freed. (That was the benchmark's own
    leak: a measuring forward without backward kept its whole graph, 24 GiB at the 7B workload, for the rest
    of the process.)
    """

    def __init__(self, model: Any) -> None:
        self._parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameters:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def hooks(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    """Collect garbage and hand cached device blocks back, so the next configuration starts from a clean slate."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def measure_matmul_peak(device: torch.device) -> float | None:
    """TFLOP/s of an 8192^3 bf16 matrix product on this GPU (None on a CPU)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del a, b
    return 2 * n**3 * repeats / seconds / 1e12


# ---------------------------------------------------------------------------------------------------------------
# Model, processor and data (as shared/bench/trl_anchor.py: nothing downloaded)
# ---------------------------------------------------------------------------------------------------------------


def build_processor(workload: Workload) -> tuple[Any, list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(2000)]
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = TEMPLATE
    size = workload.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=TEMPLATE,
        num_additional_image_tokens=1,
    )
    return processor, words


def build_model(workload: Workload, processor: Any, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(**workload.vision, image_size=workload.image_size, patch_size=14, projection_dim=768)
    text_kwargs = {"vocab_size": len(tokenizer), "max_position_embeddings": 4096, **workload.text}
    text_kwargs.setdefault("num_key_value_heads", text_kwargs["num_attention_heads"])
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_kwargs),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            model = LlavaForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    return model


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


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    workload: Workload
    device: torch.device
    dtype: torch.dtype
    processor: Any
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
            _free(self.device)
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
            before = _allocated(self.device)
            self.batch_cache[size] = ([batch.to(self.device) for batch in built], encode_pairs_per_s)
            self.resident_bytes += _allocated(self.device) - before
        return self.batch_cache[size]

    # ---- the engine's model ---------------------------------------------------------------------------------

    def engine_model(self) -> Any:
        """The LoRA-wrapped model the engine's configurations share in this process (built on first use)."""
        if self.peft_model is None:
            _free(self.device)
            before = _allocated(self.device)
            model = build_model(self.workload, self.processor, self.device, self.dtype)
            self.lm_params, self.vision_params = _count_params(model)
            self.peft_model = make_trainable(model, LORA)
            del model
            _free(self.device)
            self.resident_bytes += _allocated(self.device) - before
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
        _free(self.device)
        self.resident_bytes = _allocated(self.device)

    def leaked_bytes(self) -> int:
        """Device memory still allocated after a configuration beyond what is meant to live across them."""
        _free(self.device)
        return _allocated(self.device) - self.resident_bytes

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


def _model_tokens(batch: PairBatch, forward: str) -> int:
    prompts = sum(batch.prompt_lengths)
    answers = sum(batch.answer_lengths)
    return (prompts if forward == "packed" else 2 * prompts) + answers


def _count_params(model: Any) -> tuple[int, int]:
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


def _set_checkpointing(model: Any, enabled: bool) -> None:
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _step_setup(run: Run, model: Any, objective: ObjectiveConfig, forward: str, lr: float) -> StepSetup:
    """The trainer's step setup for this run's data: AdamW, clipping at 1.0, no schedule, cached reference."""
    set_pair_forward(model, forward)
    parameters = [p for p in model.parameters() if p.requires_grad]
    return StepSetup(
        model=model,
        parameters=parameters,
        optimizer=torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0),
        scheduler=None,
        objective=objective,
        reference=run.data.reference,
        hardness=run.data.hardness,
        hardness_mean=float(run.data.hardness.mean()),
        generator=torch.Generator().manual_seed(0),
        device=run.device,
        bf16=run.device.type == "cuda",  # as the trainer: bf16 autocast on a GPU, float32 on a CPU
        max_grad_norm=1.0,
    )


@contextlib.contextmanager
def _optimizer_uncounted(setup: StepSetup, counter: HostSyncs | None) -> Iterator[None]:
    """Leave AdamW's step out of the host-sync count: its step counters are host tensors (not ``capturable``), so
    their ``.item()`` reads host memory, not the device's."""
    if counter is None:
        yield
        return
    step = setup.optimizer.step

    def uncounted(*args: Any, **kwargs: Any) -> Any:
        with counter.pause():
            return step(*args, **kwargs)

    own = vars(setup.optimizer).get("step")  # an instance attribute already there, if any
    setup.optimizer.step = uncounted  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del setup.optimizer.step  # the class's method shows through again
        else:
            setup.optimizer.step = own  # type: ignore[method-assign]


def engine_step_config(
    run: Run, forward: str, method: str, checkpointing: bool, size: int, compiled: bool = False
) -> dict[str, Any]:
    """Times ``dama_engine.training.step.train_step``, the trainer's own step (one micro-batch per step)."""
    model = run.engine_model()
    _set_checkpointing(model, checkpointing)
    model.train()
    batches, encode_pairs_per_s = run.batches(size)
    setup = _step_setup(run, model, ObjectiveConfig(method=method, beta=0.1), forward, lr=1e-5)  # type: ignore[arg-type]
    state = ObjectiveState()
    warmup, steps = run.args.warmup, run.args.steps
    times: list[float] = []
    syncs: list[int] = []
    saved = SavedTensorBytes(model)
    last_loss = float("nan")
    first_step_s = float("nan")
    try:
        with run.layers(compiled), PeakMemory(run.device) as memory:
            for step in range(warmup + steps + 1):
                batch = batches[step % len(batches)]
                _sync(run.device)
                start = time.perf_counter()
                # The first step (a warm-up one unless --warmup 0) also counts what autograd saves for backward;
                # one more step after the timed ones counts host syncs (the counter wraps tensor methods).
                measuring = saved.hooks() if step == 0 else contextlib.nullcontext()
                last = step == warmup + steps
                counting = count_host_syncs() if last else contextlib.nullcontext()
                with measuring, counting as counter, _optimizer_uncounted(setup, counter):
                    result = train_step(setup, [batch], state, log=last or step == warmup + steps - 1)
                state = result.state
                _sync(run.device)
                if counter is not None:
                    syncs.append(counter.total)
                elif step >= warmup:
                    times.append(time.perf_counter() - start)
                elif step == 0:
                    first_step_s = time.perf_counter() - start  # with compiling, when compiled
                if result.metrics is not None and not last:
                    last_loss = result.metrics["loss"]  # the last timed step's
                del result
    finally:
        setup.optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        del setup
        _set_checkpointing(model, False)
    median = statistics.median(times)
    run.step_seconds[(checkpointing, size)] = max(run.step_seconds.get((checkpointing, size), 0.0), median)
    tokens = statistics.mean(_model_tokens(b, forward) for b in batches)
    images = size if forward == "packed" else 2 * size
    passes = 3 if checkpointing else 2
    return {
        "kind": "engine",
        "forward": forward,
        "method": method,
        "gc": checkpointing,
        "batch": size,
        "compiled": compiled,
        "first_step_s": round(first_step_s, 2),
        "steps_timed": len(times),
        "median_step_s": round(median, 4),
        **run.rates(median_s=median, pairs=size, flops=run.flops(tokens=int(tokens), images=images, passes=passes)),
        "tokens_per_s": round(tokens / median, 1),
        **memory.fields(),
        "saved_for_backward_gib": round(saved.nbytes / GIB, 4),
        "encode_pairs_per_s": round(encode_pairs_per_s, 2),
        "host_syncs_per_logging_step": syncs[0] if syncs else None,
        "last_loss": round(last_loss, 4),
    }


def agreement_config(run: Run, forwards: list[str], size: int) -> dict[str, Any]:
    """The fast paths against ``model_logits`` on one batch, in the run's precision: log-probs, loss, gradients.

    Each path runs one ``train_step`` at learning rate 0 (AdamW moves nothing) and hands over the gradients it
    stepped with, so no backward pass lives here apart from the trainer's.
    """
    model = run.engine_model()
    model.train()
    batch = run.batches(size)[0][0]
    results: dict[str, tuple[torch.Tensor, float, torch.Tensor]] = {}
    # (name, pair forward, compiled layers); the compiled entry when the run times compiled layers.
    cases = [(forward, forward, False) for forward in ["model_logits", *forwards]]
    if run.args.compile != "off" and forwards:
        cases.append((f"{forwards[0]}+compiled", forwards[0], True))
    for name, forward, compiled in cases:
        setup = _step_setup(run, model, ObjectiveConfig(method="dpo", beta=0.1), forward, lr=0.0)
        setup.max_grad_norm = None  # the gradients as computed, not clipped
        grads: list[torch.Tensor] = []
        step = setup.optimizer.step

        def keep_grads(
            *args: Any, _step: Any = step, _setup: StepSetup = setup, _grads: list[torch.Tensor] = grads, **kwargs: Any
        ) -> Any:
            _grads.extend(p.grad.detach().double().reshape(-1) for p in _setup.parameters if p.grad is not None)
            return _step(*args, **kwargs)

        setup.optimizer.step = keep_grads  # type: ignore[method-assign]
        with run.layers(compiled):
            result = train_step(setup, [batch], ObjectiveState(), log=True)
        with torch.no_grad(), run.layers(compiled), run.autocast():
            chosen, rejected = pair_log_probs(model, batch, forward=forward)
        assert result.metrics is not None
        results[name] = (torch.stack([chosen, rejected]).float(), result.metrics["loss"], torch.cat(grads))
        del setup, result, chosen, rejected
    model.zero_grad(set_to_none=True)
    plain_logps, plain_loss, plain_grads = results.pop("model_logits")
    record: dict[str, Any] = {"kind": "agreement", "batch": size, "dtype": str(run.dtype).removeprefix("torch.")}
    for forward, (logps, loss, grads) in results.items():
        record[forward] = {
            "logps_max_abs_diff": float((logps - plain_logps).abs().max()),
            "logps_max_rel_diff": float(((logps - plain_logps).abs() / plain_logps.abs().clamp(min=1e-6)).max()),
            "loss_abs_diff": abs(loss - plain_loss),
            "grad_rel_l2_diff": float((grads - plain_grads).norm() / plain_grads.norm().clamp(min=1e-30)),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(grads, plain_grads, dim=0)),
        }
    return record


def reference_config(run: Run, forward: str, size: int, compiled: bool = False) -> dict[str, Any]:
    """The trainer's reference pre-pass: adapter off, eval mode, no grad, over ``ref_pairs`` pairs."""
    model = run.engine_model()
    model.eval()
    batches, encode_pairs_per_s = run.batches(size)
    n_batches = max(1, run.args.ref_pairs // size)
    with run.layers(compiled), torch.no_grad(), model.disable_adapter(), run.autocast():
        pair_log_probs(model, batches[0], forward=forward)  # warm-up
        with PeakMemory(run.device) as memory:
            _sync(run.device)
            start = time.perf_counter()
            for i in range(n_batches):
                pair_log_probs(model, batches[i % len(batches)], forward=forward)
            _sync(run.device)
            seconds = time.perf_counter() - start
    model.train()
    pairs = n_batches * size
    tokens = statistics.mean(_model_tokens(b, forward) for b in batches)
    images = size if forward == "packed" else 2 * size
    flops = run.flops(tokens=int(tokens), images=images, passes=1) * n_batches
    return {
        "kind": "reference",
        "forward": forward,
        "compiled": compiled,
        "batch": size,
        "pairs": pairs,
        "pairs_per_s": round(pairs / seconds, 3),
        "tflops": round(flops / seconds / 1e12, 2),
        **memory.fields(),
        "encode_pairs_per_s": round(encode_pairs_per_s, 2),
    }


def hardness_config(run: Run) -> dict[str, Any]:
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from dama_engine.objective.scoring import ClipHardnessScorer

    workload = run.workload
    # One token per character (no merges): nothing to download; sub-sentences hit CLIP's 77 tokens sooner.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate([*alphabet, *(f"{c}</w>" for c in alphabet)])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    size = workload.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    text_config = {
        **workload.clip_text,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**workload.clip_vision, "image_size": size, "patch_size": 14}
    torch.manual_seed(0)
    clip: Any = CLIPModel(
        CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=workload.clip_projection)
    )
    clip.to(run.device)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    scorer = ClipHardnessScorer(clip, processor, name="random-clip-vit-l-14-336")
    rows = run.data.hardness_rows[: run.args.hardness_pairs]
    batch_size = 32
    scorer.score_pairs(rows[: min(batch_size, len(rows))], batch_size=batch_size)  # warm-up
    with PeakMemory(run.device) as memory:
        _sync(run.device)
        start = time.perf_counter()
        delta = scorer.score_pairs(rows, batch_size=batch_size)
        _sync(run.device)
        seconds = time.perf_counter() - start
    del clip, scorer
    return {
        "kind": "hardness",
        "pairs": len(rows),
        "batch": batch_size,
        "dtype": "float32",
        "pairs_per_s": round(len(rows) / seconds, 2),
        **memory.fields(),
        "delta_finite": bool(torch.isfinite(delta).all()),
    }


def trl_config(run: Run, checkpointing: bool, size: int) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = run.device.type == "cuda"
    # TRL wraps and changes the model it gets (LoRA layers, input-grad hooks, checkpointing): a fresh one, thrown
    # away afterwards (the engine's model, if this process has one, goes first to make room).
    run.drop_engine_model()
    model = build_model(run.workload, run.processor, run.device, run.dtype)
    run.lm_params, run.vision_params = _count_params(model)
    steps = run.args.warmup + run.args.steps
    dataset = Dataset.from_list(run.data.trl_rows[: steps * size + size])
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=size,
        max_steps=steps,
        logging_steps=1,
        bf16=cuda,
        gradient_checkpointing=checkpointing,
        learning_rate=1e-5,
        report_to=[],
        save_strategy="no",
        max_length=4096,
        beta=0.1,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        seed=0,
    )
    family = family_for(model)
    lora = LoraConfig(
        r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=0.0,
        target_modules=family.lora_target_regex,
        task_type="CAUSAL_LM",
    )

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            _sync(run.device)
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            _sync(run.device)
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    trainer = None
    try:
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=run.processor, peft_config=lora,
            callbacks=[timer],
        )  # fmt: skip
        # Trainer prints its logs on stdout: keep stdout for this script's JSON lines.
        with PeakMemory(run.device) as memory, contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        try:
            sample = trainer.data_collator([dict(run.data.trl_rows[0])])
            row_tokens = int(sample["input_ids"].shape[1])
        except Exception:
            batch = run.batches(size)[0][0]
            row_tokens = (2 * sum(batch.prompt_lengths) + sum(batch.answer_lengths)) // (2 * size)
    finally:
        if trainer is not None:
            with contextlib.suppress(Exception):
                trainer.accelerator.free_memory()
            for attribute in ("model", "model_wrapped", "optimizer", "lr_scheduler"):
                with contextlib.suppress(Exception):
                    setattr(trainer, attribute, None)
        del trainer, model, dataset
    timed = timer.times[run.args.warmup :] or timer.times
    median = statistics.median(timed)
    tokens = 2 * size * row_tokens
    passes = 4 if checkpointing else 3  # policy forward, backward, (recompute), reference forward
    return {
        "kind": "trl",
        "method": "dpo",
        "gc": checkpointing,
        "batch": size,
        "steps_timed": len(timed),
        "median_step_s": round(median, 4),
        **run.rates(median_s=median, pairs=size, flops=run.flops(tokens=tokens, images=4 * size, passes=passes)),
        "tokens_per_s": round(tokens / median, 1),
        "seq_len_per_row": row_tokens,
        **memory.fields(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def e2e(step_pairs_per_s: float, reference_pairs_per_s: float | None, epochs: int) -> float | None:
    """Pairs/s per epoch with the reference pre-pass amortised over ``epochs``."""
    if not reference_pairs_per_s:
        return None
    return 1.0 / (1.0 / step_pairs_per_s + 1.0 / (epochs * reference_pairs_per_s))


def _reference_key(record: dict[str, Any]) -> str:
    return record["forward"] + ("/compiled" if record.get("compiled") else "")


def report(records: list[dict[str, Any]], args: argparse.Namespace, device_type: str, started: float) -> None:
    """The table of ratios to TRL and the ``summary`` line, from the records the children printed."""
    ok = [r for r in records if "pairs_per_s" in r and "kind" in r]
    trl = [r for r in ok if r.get("kind") == "trl"]
    engine = [r for r in ok if r.get("kind") == "engine"]
    reference = {_reference_key(r): r["pairs_per_s"] for r in ok if r.get("kind") == "reference"}
    hardness = next((r["pairs_per_s"] for r in ok if r.get("kind") == "hardness"), None)
    epochs = args.epochs
    name = args.workload.name
    anchor = max(trl, key=lambda r: r["pairs_per_s"]) if trl else None
    print(f"\n## {name}: ratio of pairs/s to TRL measured in this run", flush=True)
    if anchor:
        print(
            f"TRL anchor: {anchor['config']} {anchor['pairs_per_s']} pairs/s, peak {anchor['peak_mem_gib']} GiB "
            f"({anchor['mem_kind']}); reference pass amortised over {epochs} epochs; device {device_type}"
        )
    else:
        print("TRL anchor: not measured in this run (no trl/datasets, --no-trl, an error or the budget)")
    header = "| config | pairs/s | ratio | e2e pairs/s | e2e ratio | peak GiB | TFLOP/s | MFU |"
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for record in trl + sorted(engine, key=lambda r: -r["pairs_per_s"]):
        if record["kind"] == "trl":
            total = record["pairs_per_s"]  # TRL runs the reference inside every step
        else:
            # The trainer compiles the reference pass too when it compiles the step (optim.compile).
            ref = reference.get(_reference_key(record)) or reference.get(record["forward"])
            total = e2e(record["pairs_per_s"], ref, epochs)
        ratio = record["pairs_per_s"] / anchor["pairs_per_s"] if anchor else None
        total_ratio = total / anchor["pairs_per_s"] if anchor and total else None
        rows.append((record, total, ratio, total_ratio))

        def fmt(value: float | None, digits: int = 2) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        print(
            f"| {record['config']} | {record['pairs_per_s']:.3f} | {fmt(ratio)} | {fmt(total, 3)} | "
            f"{fmt(total_ratio)} | {record['peak_mem_gib']:.2f} | {fmt(record.get('tflops'))} | "
            f"{fmt(record.get('mfu'), 3)} |"
        )
    for forward, value in reference.items():
        print(f"reference pre-pass ({forward}): {value:.3f} pairs/s")
    if hardness is not None:
        print(f"hardness pre-pass (CLIP, float32): {hardness:.2f} pairs/s")
    best = max((r for r in rows if r[0]["kind"] == "engine"), key=lambda r: r[1] or 0.0, default=None)
    summary: dict[str, Any] = {"config": "summary", "workload": name, "epochs": epochs}
    if anchor:
        summary["trl_pairs_per_s"] = anchor["pairs_per_s"]
        summary["trl_peak_mem_gib"] = anchor["peak_mem_gib"]
    if best:
        record, total, ratio, total_ratio = best
        summary.update(
            {
                "best_engine": record["config"],
                "best_step_ratio": round(ratio, 3) if ratio else None,
                "best_e2e_pairs_per_s": round(total, 3) if total else None,
                "best_e2e_ratio": round(total_ratio, 3) if total_ratio else None,
            }
        )
        if total and hardness:
            # dama / dama_data also score the data once (cached like the reference): amortised the same way.
            with_hardness = 1.0 / (1.0 / total + 1.0 / (epochs * hardness))
            summary["best_e2e_with_hardness_pairs_per_s"] = round(with_hardness, 3)
            if anchor:
                summary["best_e2e_with_hardness_ratio"] = round(with_hardness / anchor["pairs_per_s"], 3)
    if anchor:
        checkpointed = [r for r in rows if r[0]["kind"] == "engine" and r[0]["gc"] and r[1]]
        under_trl_memory = [r for r in checkpointed if r[0]["peak_mem_gib"] <= anchor["peak_mem_gib"]]
        if under_trl_memory:
            record, total, _, total_ratio = max(under_trl_memory, key=lambda r: r[1])
            summary["best_gc_within_trl_memory"] = record["config"]
            summary["best_gc_within_trl_memory_e2e_ratio"] = round(total_ratio, 3) if total_ratio else None
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(summary) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny", action="store_true", help="CPU smoke report on a tiny LLaVA")
    mode.add_argument("--llava7b", action="store_true", help="GPU: LLaVA-1.5-7B shape, bf16 (shared/PERFORMANCE.md)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them")
    parser.add_argument(
        "--methods", default=",".join(PREFERENCE_METHODS), help="DAMA methods to time (comma-separated)"
    )
    parser.add_argument("--forwards", default="packed,two_rows,model_logits", help="engine pair forwards to time")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: DAMA_TORCH_THREADS, else 1; see dama_engine.threads); reported in env",
    )
    parser.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default=None,
        help="time the engine with its decoder layers compiled (optim.compile), eager, or both "
        "(default: both with --llava7b, off with --tiny)",
    )
    parser.add_argument(
        "--extra",
        default="",
        help="more configurations to time after the others, e.g. engine/packed/dama/gc_off/b8/compiled "
        "(default with --llava7b: packed, compiled, 8 pairs without checkpointing and 12 with it)",
    )
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (also skipped when trl is not installed)")
    parser.add_argument("--no-hardness", action="store_true", help="skip the hardness pre-pass")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: the first checkpointing/batch setting and one TRL run only"
    )
    parser.add_argument("--ref-pairs", type=int, default=None, help="pairs in the timed reference pre-pass")
    parser.add_argument("--hardness-pairs", type=int, default=None, help="pairs in the timed hardness pre-pass")
    parser.add_argument("--epochs", type=int, default=4, help="epochs the reference pre-pass is amortised over")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument(
        "--only", default=None, help="run these configurations (comma-separated names) in this process: a child's job"
    )
    parser.add_argument(
        "--child-timeout-s", type=float, default=None, help="wall-clock limit of one child process (default: budget)"
    )
    parser.add_argument("--deadline-unix", type=float, default=None, help=argparse.SUPPRESS)  # set for children
    parser.add_argument("--matmul-tflops", type=float, default=None, help=argparse.SUPPRESS)  # set for children
    args = parser.parse_args(argv)
    workload = TINY if args.tiny else LLAVA7B
    if args.quick:
        workload = replace(workload, main_grid=workload.main_grid[:1], trl_extra=())
    args.workload = workload
    args.steps = args.steps if args.steps is not None else workload.steps
    args.warmup = args.warmup if args.warmup is not None else workload.warmup
    args.ref_pairs = args.ref_pairs if args.ref_pairs is not None else workload.ref_pairs
    args.hardness_pairs = args.hardness_pairs if args.hardness_pairs is not None else workload.hardness_pairs
    args.budget_s = args.budget_s if args.budget_s is not None else workload.budget_s
    args.compile = args.compile or ("both" if args.llava7b else "off")
    args.extra = [name for name in args.extra.split(",") if name]
    args.methods = [m for m in args.methods.split(",") if m]
    args.forwards = [f for f in args.forwards.split(",") if f]
    if args.llava7b and args.methods and not args.extra and args.compile != "off" and "packed" in args.forwards:
        # The best batch sizes with compiled layers on an H100 (docs/PERFORMANCE.md): 8 without checkpointing
        # (51 GiB), 12 with it (21 GiB, within TRL's 22.5).
        headline = "dama" if "dama" in args.methods else args.methods[0]
        args.extra = [f"engine/packed/{headline}/gc_off/b8/compiled", f"engine/packed/{headline}/gc_on/b12/compiled"]
    unknown = [m for m in args.methods if m not in PREFERENCE_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(PREFERENCE_METHODS)}")
    forwards = ("packed", "two_rows", "model_logits")
    if not args.methods or any(f not in forwards for f in args.forwards):
        parser.error(f"--methods must name at least one method and --forwards only {', '.join(forwards)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/stat") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# ---- the plan (parent) ----------------------------------------------------------------------------------------

REPORT_RESERVE_S = 3.0  # kept for the table at the end
CHILD_GRACE_S = 20.0  # past the deadline a child gets to print its last line before the parent kills it
MIN_CHILD_S = 12.0  # a child needs this long at least (imports, data, CUDA context) to measure anything
LEAK_LIMIT = 256 * 2**20  # device memory a configuration may leave behind before its child is replaced


def engine_name(forward: str, method: str, checkpointing: bool, size: int, compiled: bool = False) -> str:
    name = f"engine/{forward}/{method}/gc_{'on' if checkpointing else 'off'}/b{size}"
    return name + "/compiled" if compiled else name


def trl_name(checkpointing: bool, size: int) -> str:
    return f"trl/gc_{'on' if checkpointing else 'off'}/b{size}"


def plan(args: argparse.Namespace, want_trl: bool, cuda: bool) -> list[list[str]]:
    """Groups of configuration names, in priority order (the budget cuts the tail); one child per group.

    TRL gets children of its own; the engine's configurations share one child and one model.
    """
    workload: Workload = args.workload
    first = ["env"] + (["matmul_peak"] if cuda else [])
    if want_trl:
        first += [trl_name(checkpointing, size) for checkpointing, size in workload.trl_grid]
    headline = "dama" if "dama" in args.methods else args.methods[0]
    fast = [f for f in ("packed", "two_rows") if f in args.forwards]
    # Compiled layers first when both are timed (the headline), then the eager ones.
    variants = {"off": [False], "on": [True], "both": [True, False]}[args.compile]
    engine = ["model"]
    for index, compiled in enumerate(variants):
        engine += [engine_name(f, headline, gc_on, size, compiled) for f in fast for gc_on, size in workload.main_grid]
        if index == 0:
            engine += args.extra  # the best batch sizes, before the eager configurations
        engine += [f"reference/{f}" + ("/compiled" if compiled else "") for f in fast]
    engine.append("agreement")
    if not args.no_hardness:
        engine.append("hardness")
    sweep_gc, sweep_size = workload.main_grid[0]
    sweep_forward = fast[:1] or ["model_logits"]
    engine += [
        engine_name(f, m, sweep_gc, sweep_size, variants[0])
        for m in args.methods
        if m != headline
        for f in sweep_forward
    ]
    if "model_logits" in args.forwards:
        engine += [engine_name("model_logits", headline, gc_on, size) for gc_on, size in workload.main_grid]
        engine.append("reference/model_logits")
    groups = [first, engine]
    if want_trl and workload.trl_extra:
        groups.append([trl_name(checkpointing, size) for checkpointing, size in workload.trl_extra])
    return groups


def child_command(args: argparse.Namespace, names: list[str], deadline_unix: float, matmul: float | None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--tiny" if args.tiny else "--llava7b"]
    command += ["--only", ",".join(names), "--deadline-unix", f"{deadline_unix:.3f}"]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--epochs", str(args.epochs)]
    command += ["--ref-pairs", str(args.ref_pairs), "--hardness-pairs", str(args.hardness_pairs)]
    command += ["--methods", ",".join(args.methods), "--forwards", ",".join(args.forwards)]
    command += ["--compile", args.compile, "--threads", str(args.threads)]
    command += ["--budget-s", str(args.budget_s)]
    if args.quick:
        command.append("--quick")
    if args.no_trl:
        command.append("--no-trl")
    if matmul:
        command += ["--matmul-tflops", str(matmul)]
    return command


def run_child(command: list[str], timeout_s: float, on_record: Callable[[dict[str, Any]], None]) -> tuple[int, bool]:
    """Run one child, handing each JSON line it prints to ``on_record`` as it comes; (exit status, timed out).

    Its stderr goes straight to ours; other stdout lines (a library's print) go to our stderr.
    """
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        child.kill()  # this child only, by its own handle

    timer = threading.Timer(max(timeout_s, 1.0), kill)
    timer.start()
    try:
        assert child.stdout is not None
        for line in child.stdout:
            text = line.strip()
            record = None
            if text.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(text)
            if isinstance(record, dict) and "config" in record:
                on_record(record)
            elif text:
                print(text, file=sys.stderr, flush=True)
        status = child.wait()
    finally:
        timer.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    return status, timed_out.is_set()


def parent_main(args: argparse.Namespace) -> int:
    started = time.perf_counter() - _process_age_s()  # --budget-s counts from the process start, imports included
    cuda = torch.cuda.is_available()  # no CUDA context here: the device is the children's alone
    if args.llava7b and not cuda:
        print("--llava7b needs a CUDA GPU (use --tiny on a CPU)", file=sys.stderr)
        return 2
    versions = _versions()
    want_trl = not args.no_trl
    if want_trl and (versions["trl"] is None or versions["datasets"] is None):
        print("trl/datasets are not installed: TRL is skipped (pip install -e '.[bench]')", file=sys.stderr)
        want_trl = False
    records: list[dict[str, Any]] = []
    matmul: list[float] = []

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")

    def on_record(record: dict[str, Any]) -> None:
        if record.get("config") == "matmul_peak" and record.get("bf16_tflops"):
            matmul.append(float(record["bf16_tflops"]))
        emit(record)

    def left_s() -> float:
        return args.budget_s - REPORT_RESERVE_S - (time.perf_counter() - started)

    children = 0
    for group in plan(args, want_trl, cuda):
        todo = list(group)
        while todo:
            left = left_s()
            if left < MIN_CHILD_S:
                for name in todo:
                    emit({"config": name, "skipped": "budget", "left_s": round(left, 1)})
                break
            reported: set[str] = set()

            def collect(record: dict[str, Any], seen: set[str] = reported) -> None:
                seen.add(record["config"])
                on_record(record)

            deadline_unix = time.time() + left
            timeout = left + CHILD_GRACE_S
            if args.child_timeout_s:
                timeout = min(timeout, args.child_timeout_s)
            children += 1
            child_start = time.perf_counter()
            status, timed_out = run_child(
                child_command(args, todo, deadline_unix, matmul[-1] if matmul else None), timeout, collect
            )
            progressed = any(name in reported for name in todo)
            todo = [name for name in todo if name not in reported]
            if not todo:
                break
            if status == 0 and not timed_out:
                for name in todo:  # a child that exits cleanly reports every name it was given
                    emit({"config": name, "error": "not reported by its child process"})
                break
            if status != CHILD_RESTART or not progressed:
                # It died or overran inside the first configuration it had not reported: that one failed.
                why = f"killed after {timeout:.0f} s" if timed_out else f"exit status {status}"
                emit(
                    {
                        "config": todo.pop(0),
                        "error": f"child process: {why}",
                        "seconds": round(time.perf_counter() - child_start, 1),
                    }
                )
            if todo:
                print(f"bench_train: a fresh child process for {len(todo)} configurations", file=sys.stderr)
    print(f"bench_train: {children} child processes", file=sys.stderr, flush=True)
    try:
        report(records, args, "cuda" if cuda else "cpu", started)
    except Exception as error:  # the JSON lines above are the results; a broken table must not hide them
        print(json.dumps({"config": "report", "error": f"{type(error).__name__}: {error}"[:500]}), flush=True)
        return 1
    return 0


# ---- one child: the named configurations, in this process -----------------------------------------------------

CHILD_RESTART = 3  # exit status: configurations are left, run them in a fresh process


def child_main(args: argparse.Namespace) -> int:
    names = [name for name in args.only.split(",") if name]
    workload: Workload = args.workload
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    processor, words = build_processor(workload)
    largest = max(size for _, size in (*workload.main_grid, *workload.trl_grid, *workload.trl_extra))
    n_pairs = max((args.warmup + args.steps + 1) * largest, args.ref_pairs, args.hardness_pairs, 2 * largest)
    data = build_data(workload, words, n_pairs)
    run = Run(
        args=args,
        workload=workload,
        device=device,
        dtype=dtype,
        processor=processor,
        data=data,
        started=time.perf_counter() - _process_age_s(),
        matmul_tflops=args.matmul_tflops,
        deadline_unix=args.deadline_unix,
    )
    run.vision_tokens = (workload.image_size // 14) ** 2 + 1
    fast = [f for f in ("packed", "two_rows") if f in args.forwards]
    ref_size = max(size for _, size in workload.main_grid)
    check_size = workload.main_grid[0][1]
    for index, name in enumerate(names):
        run_named(run, name, fast=fast, ref_size=ref_size, check_size=check_size)
        left = names[index + 1 :]
        if not left:
            break
        leaked = run.leaked_bytes() if cuda else 0
        if run.restart or leaked > LEAK_LIMIT:
            why = "ran out of memory" if run.restart else f"left {leaked / GIB:.2f} GiB allocated"
            print(f"bench_train: {name} {why}: the rest goes to a fresh process", file=sys.stderr, flush=True)
            return CHILD_RESTART
    return 0


def run_named(run: Run, name: str, *, fast: list[str], ref_size: int, check_size: int) -> None:
    """Run the configuration called ``name`` and print its line (a result, an error or ``skipped``)."""
    args, workload = run.args, run.workload
    if name == "env":
        cuda = run.device.type == "cuda"
        versions = _versions()
        run.emit(
            {
                "config": "env",
                "workload": workload.name,
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "dtype": str(run.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                **versions,
                "trl_included": not args.no_trl and versions["trl"] is not None and versions["datasets"] is not None,
                "budget_s": args.budget_s,
                "isolation": "child processes",
            }
        )
        return
    if name == "matmul_peak":
        try:
            run.matmul_tflops = measure_matmul_peak(run.device)
            run.emit({"config": "matmul_peak", "kind": "matmul", "bf16_tflops": round(run.matmul_tflops or 0.0, 1)})
        except Exception as error:
            run.emit({"config": "matmul_peak", "error": f"{type(error).__name__}: {error}"[:500]})
        _free(run.device)
        return
    if name == "model":
        start = time.perf_counter()
        try:
            model = run.engine_model()
        except Exception as error:
            run.restart = True
            run.emit({"config": "model", "error": f"{type(error).__name__}: {error}"[:500]})
            return
        run.emit(
            {
                "config": "model",
                "lm_params": run.lm_params,
                "vision_params": run.vision_params,
                "attn_implementation": model.config.get_text_config()._attn_implementation,
                "lora_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "resident_gib": round(run.resident_bytes / GIB, 3),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        return
    parts = name.split("/")
    compiled = parts[-1] == "compiled"
    if compiled:
        parts = parts[:-1]
    if parts[0] == "engine" and len(parts) == 5:
        _, forward, method, gc_setting, batch = parts
        checkpointing, size = gc_setting == "gc_on", int(batch.removeprefix("b"))
        known = run.step_seconds.get((checkpointing, size))
        guess = (args.warmup + args.steps) * known * 1.5 + 2 if known else workload.guess_config_s
        run.attempt(name, guess, lambda: engine_step_config(run, forward, method, checkpointing, size, compiled))
    elif parts[0] == "reference" and len(parts) == 2:
        known = run.step_seconds.get((False, ref_size)) or run.step_seconds.get((True, ref_size))
        guess = (args.ref_pairs // ref_size + 1) * known if known else workload.guess_config_s
        run.attempt(name, guess, lambda: reference_config(run, parts[1], ref_size, compiled))
    elif name == "agreement":
        run.attempt(name, workload.guess_config_s, lambda: agreement_config(run, fast, check_size))
    elif name == "hardness":
        run.attempt(name, workload.guess_config_s, lambda: hardness_config(run))
    elif parts[0] == "trl" and len(parts) == 3:
        checkpointing, size = parts[1] == "gc_on", int(parts[2].removeprefix("b"))
        run.attempt(name, workload.guess_trl_s, lambda: trl_config(run, checkpointing, size))
    else:
        run.emit({"config": name, "error": "unknown configuration name"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every child runs with the same, deliberate thread count (the env line reports torch's own count).
    args.threads = apply_threads(args.threads)
    if args.only is not None:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
