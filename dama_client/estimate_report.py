"""A job estimate as lines of text (``dama jobs create ... --estimate``): rows, steps, tokens, peak memory per GPU
with its parts, time, whether it fits and what to change. The options table is printed by the command itself.

The server's ``does_not_fit`` message says the peak the same way (:func:`peak_text`, :func:`parts_text`): the API
may import this module (it needs only the standard library, and the client package's httpx and pydantic, which the
service installs too); the client never imports the API.
"""

from __future__ import annotations

from typing import Any

# The options table's columns (``estimate["options"]``), as the command prints them.
OPTION_COLUMNS = ("strategy", "gradient_checkpointing", "batch_size", "world_size", "peak_gib", "fits")
# How the engine forms the peak from its parts (``dama_engine.training.estimate``): the trainer drops gradients
# before each forward and the backward frees activations as it makes gradients, so the two are never all live.
PEAK_RULE = "peak = weights + optimizer_state + gathered + max(activations, gradients)"


def summary_lines(figures: dict[str, Any]) -> list[str]:
    """What a succeeded estimate says, before its options table."""
    tokens, memory = figures.get("tokens") or {}, figures.get("memory") or {}
    parameters = figures.get("parameters") or {}
    lines = [
        f"rows: {figures.get('rows')} ({figures.get('rows_measured')} measured"
        + (f", {figures['rows_over_length']} over max_length" if figures.get("rows_over_length") else "")
        + ")",
        f"steps: {figures.get('steps')} ({figures.get('epochs')} epochs)",
        f"tokens: {tokens.get('per_pair_mean')} per pair on average, {tokens.get('per_pair_max')} at most; "
        f"{tokens.get('total')} in all",
        f"parameters: {_count(parameters.get('total'))}, {_count(parameters.get('trainable'))} trained",
        f"peak memory: {peak_text(memory)}",
        f"  {parts_text(memory)}",
        _fits(figures),
        _time(figures.get("time")),
        f"checkpoint: {gib(figures.get('checkpoint_gib'))} on disk",
    ]
    return lines


def advice_lines(figures: dict[str, Any]) -> list[str]:
    """What to change when the job does not fit (empty when it fits)."""
    advice = figures.get("advice") or []
    return ["what to change:", *(f"  - {item}" for item in advice)] if advice else []


def peak_text(memory: dict[str, Any]) -> str:
    """The peak per GPU and the setup it is for: ``46 GiB per GPU (ddp on 1 GPU(s), batch_size 8, gradient
    checkpointing off, compiled on)``."""
    setup = [
        f"{memory.get('strategy', '?')} on {memory.get('world_size', '?')} GPU(s)",
        f"batch_size {memory.get('batch_size', '?')}",
        f"gradient checkpointing {_on(memory.get('gradient_checkpointing'))}",
    ]
    if "compiled" in memory:
        setup.append(f"compiled {_on(memory['compiled'])}")
    return f"{gib(memory.get('peak_gib'))} per GPU ({', '.join(setup)})"


def parts_text(memory: dict[str, Any]) -> str:
    """The peak's parts and how they make it (they do not add up to it: activations and gradients are never
    all live at once)."""
    parts = ", ".join(f"{name} {gib(value)}" for name, value in (memory.get("parts_gib") or {}).items())
    return f"parts: {parts or 'none given'} ({PEAK_RULE}; the CUDA context and the allocator's cache come on top)"


def gib(value: Any) -> str:
    """GiB with three significant digits, as the engine rounds them; ``? GiB`` when not a number."""
    return f"{value:.3g} GiB" if isinstance(value, int | float) else "? GiB"


def _fits(figures: dict[str, Any]) -> str:
    fits, memory = figures.get("fits"), figures.get("gpu_memory_gib")
    if fits is None:
        return "fits: unknown (the service does not know its GPUs' memory: DAMA_WORKER_GPU_MEMORY_GB)"
    return f"fits one {gib(memory)} GPU: {'yes' if fits else 'no'}"


def _time(time: dict[str, Any] | None) -> str:
    if not time:
        return "time: unknown (the service names no GPU kind its table knows: DAMA_WORKER_GPU_KIND)"
    return (
        f"time on {time.get('gpu_kind')}: {_duration(time.get('seconds'))} (reference pass "
        f"{_duration(time.get('reference_pass_s'))}); {time.get('pairs_per_s')} pairs/s"
    )


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _on(value: Any) -> str:
    return "on" if value else "off"
