"""Before a GPU is taken: how many rows, steps and tokens a training run has, how much memory one GPU needs at the
step's peak, how long it takes, and whether it fits (``POST /jobs/estimate``, ``dama jobs create --estimate``).

:func:`estimate_training` reads the model's config only (the model is built on the meta device: module names and
shapes, no weights), applies the run's LoRA or full fine-tuning to it to count what trains, and measures the
dataset's lengths with the model's own processor (up to ``max_rows`` rows, evenly spaced; images are read for
their token counts). Everything else is arithmetic, written out below so it can be checked.

**Memory per GPU at the step's peak** (the bytes of live tensors, what ``torch.cuda.max_memory_allocated`` reports;
the CUDA context and the allocator's cache come on top):

* *weights*: frozen parameters in the compute dtype (bf16 on a GPU with LoRA; float32 under a full fine-tune,
  whose frozen vision tower is loaded in float32 too), trainable ones in float32;
* *optimizer state*: AdamW's two float32 moments per trainable parameter (8 B);
* *gradients*: a float32 gradient per trainable parameter (4 B), and on a GPU the float32 temporary of AdamW's
  multi-tensor step (4 B). The trainer drops the gradients before each forward (``set_to_none``), and the
  backward frees activations as it makes gradients, so the peak holds the larger of the two, not both:
  ``peak = weights + optimizer state + max(activations, gradients)``;
* under ``fsdp`` the weights and the trainable state are divided by the world size, and two decoder layers and
  the root unit (embeddings, head, vision tower, projector) are all-gathered in the compute dtype at a time;
* *activations* of one micro-batch, its tokens ``T`` being the ``batch_size`` longest measured pairs (the worst
  batch the shuffle can draw). Per decoder layer and token, in the compute dtype of ``b`` bytes (2 for bf16):
  ``b x (6 H + 4 KV + 4 I + n_lora r)``, plus ``2 x 4 H`` where the compute dtype is bf16 (the RMSNorm's
  float32 copies), with ``H`` the hidden size, ``KV`` the key/value width (``num_key_value_heads x head_dim``),
  ``I`` the MLP width and ``n_lora`` LoRA's modules per layer of rank ``r``; with LoRA dropout, ``b + 1`` bytes
  more per input width of each LoRA module (the dropped copy and its mask: peft applies dropout per module).
  For LLaVA-1.5-7B (``H = KV = 4096``, ``I = 11008``, seven r64 LoRA modules, no dropout) that is 199 KiB per
  layer and token, 175 MiB per packed pair of 901 tokens: the H100 measured 190 MiB (docs/PERFORMANCE.md: 42%
  MLP, 40% attention, 15% float32 norm copies, 2% LoRA). Without gradient checkpointing every layer keeps them,
  with checkpointing each layer keeps its input (``b x H`` per token) and one layer is recomputed at a time; in
  both cases one layer's worth more is live while the backward turns it into gradients. Compiled decoder layers keep
  :data:`COMPILED_ACTIVATIONS` of the eager bytes (measured on the H100: 15.8 instead of 24.4 GiB saved for
  backward at batch 4). The answer-only head keeps the gathered answer hidden states; ``model_logits`` keeps the
  full logits (bf16 and their float32 log-softmax). A vision tower that trains keeps the same per-token bytes
  for its image tokens over its layers (with its own widths and no LoRA). On a CPU (``cuda=False``: the check of
  ``benchmarks/estimate_memory.py``) torch's attention with the packed layout's mask also keeps each row's softmax,
  ``heads x T^2``.

The layout sets ``T``: ``packed`` holds each pair once as ``prompt + chosen + rejected``; ``two_rows`` and
``model_logits`` hold two rows of ``prompt + the longer answer`` (padded).

**Time**: ``2 x (language-model parameters without the input embedding) x tokens`` FLOPs per pass, passes per
pair: forward and backward to the inputs (2), a third for the weights' gradients in a full fine-tune, one more
when checkpointing recomputes; plus the vision tower's forward. Divided by a card's measured bf16 matrix-product
peak times the model FLOP utilisation the H100 runs reached for the same kind of step (:data:`MFU`), per GPU, the
ranks scaling linearly. The reference pre-pass (one forward per pair, on one GPU) at :data:`REFERENCE_MFU`. Only
the H100 is measured; other kinds scale its figures by their datasheet's dense bf16 peak (:data:`GPU_KINDS`
names the source of each). Compile time and the evaluation after training are left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dama_engine.config import LoraSection, TrainConfig
from dama_engine.data import PreferenceRow
from dama_engine.errors import UserError
from dama_engine.forward import EncodingError, PairEncoder, resolve_pair_forward
from dama_engine.models import family_for, load_processor, make_trainable
from dama_engine.training.recipe import load_rows

GIB = 2**30
COMPILED_ACTIVATIONS = 15.8 / 24.4  # H100, LLaVA-1.5-7B, packed, batch 4: saved-for-backward compiled / eager
ADAM_STATE_BYTES = 8  # AdamW's two float32 moments per trainable parameter
GRADIENT_BYTES = 4  # a float32 gradient per trainable parameter
ADAM_TEMPORARY_BYTES = 4  # AdamW's multi-tensor (foreach) step on a GPU: one float32 temporary of the trained size

# Model FLOP utilisation of a training step on the H100 (docs/PERFORMANCE.md, 2026-11-26: packed, dama),
# by (compiled layers, gradient checkpointing).
MFU: dict[tuple[bool, bool], float] = {
    (True, False): 0.517,  # compiled, batch 8
    (True, True): 0.529,  # compiled, checkpointing, batch 12
    (False, False): 0.310,  # eager, batch 4
    (False, True): 0.336,  # eager, checkpointing, batch 8
}
# The reference pre-pass: 43.7 pairs/s compiled, 34.4 eager, at about 1.2e13 FLOPs per pair and 790 TFLOP/s.
REFERENCE_MFU: dict[bool, float] = {True: 0.56, False: 0.44}


@dataclass(frozen=True)
class GpuKind:
    """A card's bf16 dense matrix-product throughput (TFLOP/s) and where the figure comes from."""

    tflops: float
    source: str


GPU_KINDS: dict[str, GpuKind] = {
    "H100": GpuKind(790.0, "measured: 8192^3 bf16 matmul on an H100 80GB HBM3 (docs/PERFORMANCE.md)"),
    "H200": GpuKind(790.0, "the H100's measured figure (the same compute, more memory); not measured"),
    "A100": GpuKind(250.0, "datasheet 312 TFLOP/s scaled by the H100's measured/datasheet ratio 0.80; not measured"),
    "L40S": GpuKind(290.0, "datasheet 362 TFLOP/s scaled by the H100's measured/datasheet ratio 0.80; not measured"),
}


@dataclass(frozen=True)
class Widths:
    """What the activation arithmetic needs of a stack of layers."""

    layers: int
    hidden: int
    kv: int
    intermediate: int
    heads: int


@dataclass(frozen=True)
class ModelCounts:
    total: int
    trainable: int
    language_model: int
    input_embedding: int
    vision_tower: int
    projector: int
    vision_trains: bool
    lora_per_layer: int
    lora_r: int
    lora_inputs_per_layer: int  # summed input widths of a layer's LoRA modules (dropout keeps a copy of each input)
    lora_dropout: float
    language: Widths
    vision: Widths | None
    vocab: int
    pair_forward: str

    def to_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "trainable": self.trainable,
            "language_model": self.language_model,
            "vision_tower": self.vision_tower,
            "projector": self.projector,
        }


@dataclass(frozen=True)
class PairLengths:
    """Measured token counts: per pair, as each layout holds it."""

    rows: int
    measured: int
    over_length: int
    packed: list[int]  # prompt + chosen + rejected
    two_rows: list[int]  # 2 x (prompt + the longer answer)
    answers: list[int]  # chosen + rejected
    image_tokens: float  # mean per pair

    def tokens(self, layout: str) -> list[int]:
        return self.packed if layout == "packed" else self.two_rows


def _config_int(config: Any, *names: str, default: int = 0) -> int:
    """The first of ``names`` the config sets (families name their widths differently: Qwen2-VL's vision tower
    has ``embed_dim`` and ``depth``)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return default


def _widths(config: Any) -> Widths:
    hidden = _config_int(config, "embed_dim", "hidden_size")  # a Qwen2-VL tower: hidden_size is its output
    heads = _config_int(config, "num_attention_heads", "num_heads", default=1)
    head_dim = _config_int(config, "head_dim", default=hidden // max(heads, 1))
    kv_heads = _config_int(config, "num_key_value_heads", default=heads)
    ratio = float(getattr(config, "mlp_ratio", None) or 4)
    intermediate = _config_int(config, "intermediate_size", default=int(hidden * ratio))
    layers = _config_int(config, "num_hidden_layers", "depth")
    return Widths(layers=layers, hidden=hidden, kv=kv_heads * head_dim, intermediate=intermediate, heads=heads)


def _lora_section(config: TrainConfig) -> LoraSection:
    """The run's LoRA settings; a starting adapter brings its own rank and target modules."""
    if config.model.init_adapter is None:
        return config.lora
    adapter = json.loads((Path(config.model.init_adapter) / "adapter_config.json").read_text())
    targets = adapter.get("target_modules")  # peft's own forms: a regex over full names, or a list of names
    return config.lora.model_copy(update={"r": int(adapter.get("r", config.lora.r)), "target_modules": targets})


def count_model(config: TrainConfig) -> ModelCounts:
    """Parameter counts and widths of the run's model, built on the meta device with its LoRA (no weights read)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    section = config.model
    model_config = AutoConfig.from_pretrained(
        section.name_or_path, revision=section.revision, trust_remote_code=section.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(model_config, trust_remote_code=section.trust_remote_code)
    family = family_for(model)
    lora = _lora_section(config)
    input_embedding = model.get_input_embeddings().weight.numel()
    pair_forward = resolve_pair_forward(model, config.optim.pair_forward)
    trainable = make_trainable(model, lora)
    total = used = language = vision = projector = vision_trained = 0
    for name, parameter in trainable.named_parameters():
        name = name.removeprefix("base_model.model.")
        total += parameter.numel()
        used += parameter.numel() if parameter.requires_grad else 0
        if family.is_projector_param(name):
            projector += parameter.numel()
        elif family.is_vision_tower_param(name):
            vision += parameter.numel()
            vision_trained += parameter.numel() if parameter.requires_grad else 0
        elif ".lora_" not in name:  # the language model, its embeddings and output head
            language += parameter.numel()
    text = model_config.get_text_config()
    language_widths = _widths(text)
    lora_a = [module for name, module in trainable.named_modules() if name.endswith(".lora_A.default")]
    vision_config = getattr(model_config, "vision_config", None)
    return ModelCounts(
        total=total,
        trainable=used,
        language_model=language,
        input_embedding=input_embedding,
        vision_tower=vision,
        projector=projector,
        vision_trains=vision_trained > 0,
        lora_per_layer=round(len(lora_a) / max(language_widths.layers, 1)),
        lora_r=lora.r,
        lora_inputs_per_layer=round(sum(m.in_features for m in lora_a) / max(language_widths.layers, 1)),
        lora_dropout=lora.dropout if lora.enabled else 0.0,
        language=language_widths,
        vision=_widths(vision_config) if vision_config is not None else None,
        vocab=int(text.vocab_size),
        pair_forward=pair_forward,
    )


def measure_lengths(config: TrainConfig, *, max_rows: int) -> PairLengths:
    """Token counts of up to ``max_rows`` training rows (evenly spaced), encoded as training encodes them."""
    train_rows, _ = load_rows(config)
    if not train_rows:
        raise UserError("data.train: no training rows")
    pixels = config.data.pixel_budget()
    encoder = PairEncoder(
        load_processor(config.model, pixels),
        max_length=config.data.max_length,
        truncate_answers=config.data.truncate_answers,
        pixels=pixels,
    )
    image_token = _image_token_id(encoder)
    stride = max(1, math.ceil(len(train_rows) / max_rows))
    sample: list[PreferenceRow] = train_rows[::stride]
    packed, two_rows, answers, images = [], [], [], 0
    over = 0
    for row in sample:
        try:
            pair = encoder.encode(row, with_images=False)
        except EncodingError:
            over += 1
            continue
        prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        packed.append(prompt + chosen + rejected)
        two_rows.append(2 * (prompt + max(chosen, rejected)))
        answers.append(chosen + rejected)
        images += sum(1 for token in pair.prompt_ids if token == image_token) if image_token is not None else 0
    if not packed:
        raise UserError(
            f"data.train: none of the {len(sample)} rows measured fits data.max_length {config.data.max_length}"
        )
    return PairLengths(
        rows=len(train_rows),
        measured=len(packed),
        over_length=over,
        packed=packed,
        two_rows=two_rows,
        answers=answers,
        image_tokens=images / len(packed),
    )


def _image_token_id(encoder: PairEncoder) -> int | None:
    token = getattr(encoder.processor, "image_token", None)
    if not isinstance(token, str):
        return None
    found = encoder.tokenizer.convert_tokens_to_ids(token)
    return found if isinstance(found, int) else None


@dataclass(frozen=True)
class Setup:
    """One way to run: the strategy, checkpointing, the micro-batch and the ranks."""

    strategy: str
    gradient_checkpointing: bool
    batch_size: int
    world_size: int


def _layer_bytes(widths: Widths, compute_bytes: int, lora: int = 0, r: int = 0, dropout_inputs: int = 0) -> float:
    """Bytes autograd keeps per token for one layer (module docstring)."""
    kept = compute_bytes * (6 * widths.hidden + 4 * widths.kv + 4 * widths.intermediate + lora * r)
    kept += (compute_bytes + 1) * dropout_inputs  # LoRA dropout: each input's dropped copy and its boolean mask
    if compute_bytes == 2:
        kept += 2 * 4 * widths.hidden  # RMSNorm's float32 copies
    return float(kept)


def memory_parts(
    counts: ModelCounts,
    lengths: PairLengths,
    setup: Setup,
    *,
    bf16: bool,
    lora: bool,
    compiled: bool,
    cuda: bool = True,
) -> dict[str, float]:
    """The peak's parts in bytes for one GPU (module docstring); :func:`peak_bytes` adds them up. ``cuda=False``
    (the CPU check) leaves out AdamW's multi-tensor temporary, which torch uses on GPUs only."""
    compute_bytes = 2 if bf16 else 4
    frozen_bytes = compute_bytes if lora else 4
    frozen = counts.total - counts.trainable
    shards = setup.world_size if setup.strategy == "fsdp" else 1
    weights = (frozen * frozen_bytes + counts.trainable * 4) / shards
    state = counts.trainable * ADAM_STATE_BYTES / shards
    gradients = counts.trainable * (GRADIENT_BYTES + (ADAM_TEMPORARY_BYTES if cuda else 0)) / shards
    gathered = 0.0
    if setup.strategy == "fsdp" and setup.world_size > 1:
        per_layer = counts.language_model / max(counts.language.layers, 1)
        root = counts.total - counts.language_model + counts.input_embedding
        gathered = (2 * per_layer + root) * compute_bytes
    tokens = sorted(lengths.tokens(counts.pair_forward), reverse=True)[: setup.batch_size]
    batch_tokens = sum(tokens) * setup.batch_size / len(tokens)  # fewer measured rows than the batch: scaled
    scale = COMPILED_ACTIVATIONS if compiled else 1.0
    language = counts.language
    dropout_inputs = counts.lora_inputs_per_layer if counts.lora_dropout > 0 else 0
    per_layer_token = _layer_bytes(language, compute_bytes, counts.lora_per_layer, counts.lora_r, dropout_inputs)
    per_layer_token *= scale
    # Layers whose activations live at once: all of them (or, under checkpointing, the one being recomputed, the
    # layers' inputs being kept), plus one layer's worth of their gradients while that layer's backward runs.
    live_layers = (1 if setup.gradient_checkpointing else language.layers) + 1
    activations = batch_tokens * live_layers * per_layer_token
    if setup.gradient_checkpointing:
        activations += batch_tokens * language.layers * compute_bytes * language.hidden
    if not cuda and counts.pair_forward == "packed":
        # torch's CPU attention with the packed layout's 4D mask keeps each row's softmax (heads x T x T) for
        # backward; the GPU kernels, and the CPU's with the other layouts' causal mask, keep O(T).
        square = sum(t**2 for t in tokens) * setup.batch_size / len(tokens)
        activations += square * language.heads * compute_bytes * live_layers
    answers = sorted(lengths.answers, reverse=True)[: setup.batch_size]
    answer_tokens = sum(answers) * setup.batch_size / len(answers)
    if counts.pair_forward == "model_logits":
        activations += batch_tokens * counts.vocab * (compute_bytes + 4)
    else:
        activations += answer_tokens * language.hidden * compute_bytes
    if counts.vision_trains and counts.vision is not None:
        image_tokens = lengths.image_tokens * setup.batch_size * (1 if counts.pair_forward == "packed" else 2)
        vision_token = _layer_bytes(counts.vision, compute_bytes)
        activations += image_tokens * counts.vision.layers * vision_token
    return {
        "weights": weights,
        "optimizer_state": state,
        "gathered": gathered,
        "activations": activations,
        "gradients": gradients,
    }


def peak_bytes(parts: dict[str, float]) -> float:
    """Weights, optimizer state and all-gathered units, plus the larger of activations and gradients."""
    return (
        parts["weights"] + parts["optimizer_state"] + parts["gathered"] + max(parts["activations"], parts["gradients"])
    )


def _pair_flops(counts: ModelCounts, lengths: PairLengths, *, lora: bool, checkpointing: bool) -> tuple[float, float]:
    """FLOPs of one pair's training step and of its reference forward (module docstring)."""
    tokens = sum(lengths.tokens(counts.pair_forward)) / len(lengths.packed)
    per_pass = 2 * (counts.language_model - counts.input_embedding) * tokens
    passes = (2 if lora else 3) + (1 if checkpointing else 0)
    vision = 2 * counts.vision_tower * lengths.image_tokens
    return per_pass * passes + vision, per_pass + vision


def estimate_training(
    config: TrainConfig,
    *,
    world_size: int = 1,
    gpu_kind: str | None = None,
    gpu_memory_gib: float | None = None,
    max_rows: int = 512,
) -> dict[str, Any]:
    """Rows, steps, tokens, peak memory per GPU (for this run and its alternatives), time on ``gpu_kind``, and
    whether it fits ``gpu_memory_gib`` with advice when it does not (module docstring). JSON-able."""
    counts = count_model(config)
    lengths = measure_lengths(config, max_rows=max_rows)
    optim = config.optim
    lora = config.lora.enabled
    bf16 = config.model.precision != "fp32"  # the estimate is for GPUs: ``auto`` is bf16 there
    compiled = optim.compile != "off"
    strategy = config.distributed.strategy if world_size > 1 else "ddp"
    wanted = Setup(strategy, optim.gradient_checkpointing, optim.batch_size, world_size)

    def peak(setup: Setup) -> tuple[float, dict[str, float]]:
        parts = memory_parts(counts, lengths, setup, bf16=bf16, lora=lora, compiled=compiled)
        return peak_bytes(parts) / GIB, {name: _gib(value) for name, value in parts.items()}

    def fits(gib: float) -> bool | None:
        return None if gpu_memory_gib is None else gib <= gpu_memory_gib

    peak_gib, parts = peak(wanted)
    options = []
    for setup in _alternatives(wanted):
        gib, _ = peak(setup)
        options.append({**setup.__dict__, "peak_gib": _gib(gib * GIB), "fits": fits(gib)})

    per_epoch = (lengths.rows // (optim.batch_size * world_size)) // optim.grad_accumulation
    steps = optim.max_steps or optim.epochs * per_epoch
    pairs_trained = steps * optim.batch_size * world_size * optim.grad_accumulation
    mean_tokens = sum(lengths.tokens(counts.pair_forward)) / len(lengths.packed)
    return {
        "rows": lengths.rows,
        "rows_measured": lengths.measured,
        "rows_over_length": lengths.over_length,
        "steps": steps,
        "epochs": optim.epochs if optim.max_steps is None else round(pairs_trained / max(lengths.rows, 1), 2),
        "tokens": {
            "layout": counts.pair_forward,
            "per_pair_mean": round(mean_tokens, 1),
            "per_pair_max": max(lengths.tokens(counts.pair_forward)),
            "image_tokens_per_pair": round(lengths.image_tokens, 1),
            "total": round(mean_tokens * pairs_trained),
        },
        "parameters": counts.to_dict(),
        "memory": {
            "peak_gib": _gib(peak_gib * GIB),
            "parts_gib": parts,
            **wanted.__dict__,
            "compiled": compiled,
            "dtype": "bf16" if bf16 else "fp32",
        },
        "options": options,
        "time": training_time(
            counts, lengths, gpu_kind, pairs_trained, world_size, lora=lora, wanted=wanted, compiled=compiled
        ),
        "checkpoint_gib": _gib(counts.trainable * (4 + ADAM_STATE_BYTES)),
        "fits": fits(peak_gib),
        "gpu_memory_gib": gpu_memory_gib,
        "advice": [] if fits(peak_gib) in (True, None) else _advice(wanted, options, gpu_memory_gib or 0.0),
    }


def _gib(value: float) -> float:
    """Bytes as GiB with three significant digits at least (a tiny model's megabytes stay visible)."""
    gib = value / GIB
    return round(gib, 2) if gib >= 10 else float(f"{gib:.3g}")


def _alternatives(wanted: Setup) -> list[Setup]:
    """The run as asked, with checkpointing toggled, at half the batch, and sharded over 2-8 GPUs."""
    seen: list[Setup] = []
    candidates = [
        wanted,
        Setup(wanted.strategy, not wanted.gradient_checkpointing, wanted.batch_size, wanted.world_size),
        Setup(wanted.strategy, True, max(1, wanted.batch_size // 2), wanted.world_size),
        *(Setup("fsdp", True, wanted.batch_size, gpus) for gpus in (2, 4, 8) if gpus >= wanted.world_size),
    ]
    for setup in candidates:
        if setup not in seen:
            seen.append(setup)
    return seen


def _advice(wanted: Setup, options: list[dict[str, Any]], gpu_memory_gib: float) -> list[str]:
    """What to change, cheapest first: the options that fit."""
    advice = []
    for option in options:
        if not option["fits"]:
            continue
        peak = f"{option['peak_gib']} GiB per GPU"
        if option["world_size"] != wanted.world_size:
            advice.append(
                f"shard over more GPUs: gpus {option['world_size']} with distributed.strategy fsdp and "
                f"optim.gradient_checkpointing on ({peak})"
            )
        elif option["batch_size"] != wanted.batch_size:
            accumulation = wanted.batch_size // option["batch_size"]
            advice.append(
                f"halve the micro-batch: optim.batch_size {option['batch_size']} with optim.grad_accumulation x"
                f"{accumulation} keeps the same pairs per step, with optim.gradient_checkpointing on ({peak})"
            )
        elif option["gradient_checkpointing"] != wanted.gradient_checkpointing:
            advice.append(f"turn optim.gradient_checkpointing on, about 30% slower ({peak})")
    if not advice:
        advice.append(
            f"no setting tried fits {gpu_memory_gib} GiB: use GPUs with more memory, a smaller model, a lower "
            "data.max_length or data.max_pixels, or LoRA instead of a full fine-tune"
        )
    return advice


def training_time(
    counts: ModelCounts,
    lengths: PairLengths,
    gpu_kind: str | None,
    pairs: int,
    world_size: int,
    *,
    lora: bool,
    wanted: Setup,
    compiled: bool,
) -> dict[str, Any] | None:
    kind = GPU_KINDS.get((gpu_kind or "").upper())
    if kind is None:
        return None
    step_flops, reference_flops = _pair_flops(counts, lengths, lora=lora, checkpointing=wanted.gradient_checkpointing)
    pairs_per_s = kind.tflops * 1e12 * MFU[(compiled, wanted.gradient_checkpointing)] / step_flops
    reference_per_s = kind.tflops * 1e12 * REFERENCE_MFU[compiled] / reference_flops
    training_s = pairs / (pairs_per_s * world_size)
    reference_s = lengths.rows / reference_per_s
    return {
        "gpu_kind": (gpu_kind or "").upper(),
        "seconds": round(training_s + reference_s, 1),
        "training_s": round(training_s, 1),
        "reference_pass_s": round(reference_s, 1),
        "pairs_per_s": round(pairs_per_s * world_size, 2),
        "source": f"{kind.source}; utilisation {MFU[(compiled, wanted.gradient_checkpointing)]} from the H100 runs",
    }
