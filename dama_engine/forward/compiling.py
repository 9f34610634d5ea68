"""Regional ``torch.compile`` of the language model's decoder layers (``optim.compile``).

Most of a LoRA-DPO step on a 7B model is matrix products, but between them every decoder layer runs a few dozen
memory-bound element-wise kernels: transformers' RMSNorm upcasts the hidden state to float32 and back, rotary
embeddings, SiLU times the up projection, residual additions, and peft adding each LoRA branch to its base
projection. ``torch.compile`` fuses them (and cuts the kernel launches). Compiling the whole model would trace the
vision tower, the processor-dependent merging of image features and the engine's own packing code, and recompile
for every new batch layout; compiling only the repeated decoder layer (PyTorch's "regional compilation") traces
one small graph that all layers share, compiles once in seconds and leaves everything else eager.

* ``compile_decoder_layers(model, mode)`` calls ``nn.Module.compile()`` on each decoder layer in place (parameter
  names and the saved adapter stay as they are). It works with gradient checkpointing (the checkpoint wraps the
  compiled layer), peft's adapter switch (the reference pass recompiles once with the adapter off), autocast and
  DDP.
* Generation (``dama_engine.forward.generation``) runs under :func:`eager`: a growing key/value cache would recompile
the
  layer at every new length.
* ``mode="auto"`` compiles on CUDA only: on a CPU the compile time (tens of seconds) outweighs the gain for the
  tiny models that run there. If compiling fails at run time (no C compiler for Triton's launcher, an operator
  the compiler does not know), ``auto`` falls back to the eager layer with a warning; ``layers`` lets it fail.

``tests/engine/test_compiling.py`` checks that the compiled layers give the eager layers' log-probs, loss and
LoRA gradients (float32, packed and two-row layouts, checkpointing on and off).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from dama_engine.models import family_for, unwrap_model
from dama_settings.names import COMPILE_MODES as COMPILE_MODES
from dama_settings.names import CompileMode as CompileMode

# Guard sets one training run may need per layer class: training with and without gradients, the adapter on and
# off (reference pass), train/eval mode, a static and then a dynamic batch shape, checkpointing. PyTorch's default
# (8) is shared by every module compiled through nn.Module.compile (they share one code object).
_RECOMPILE_LIMIT = 64

logger = logging.getLogger(__name__)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated decoder layers of ``model``'s language model (under DDP and peft wrappers too).

    Raises:
        ValueError: the language model has no ``layers`` module list (an unknown layout).
    """
    base = unwrap_model(model)
    family = family_for(base)
    language_model = base.get_submodule(family.language_model_prefix)
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{family.language_model_prefix} of this {family.name} model has no `layers` module list")
    return list(layers)


def resolve_compile(mode: str, device: torch.device) -> bool:
    """Whether ``mode`` compiles on ``device``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile {mode!r} is unknown; choose one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return False
    return mode == "layers" or device.type == "cuda"


def compile_decoder_layers(model: Any, mode: str, device: torch.device) -> int:
    """Compile each decoder layer of ``model`` in place when ``mode`` asks for it on ``device``.

    Returns:
        How many layers were compiled (0 when ``mode`` resolves to off).
    """
    if not resolve_compile(mode, device):
        return 0
    try:
        layers = decoder_layers(model)
    except (TypeError, ValueError) as error:
        if mode == "layers":
            raise ValueError(f"compile 'layers' is not possible: {error}; use 'auto' or 'off'") from error
        logger.warning("not compiling: %s", error)
        return 0
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # Round to bf16 after every operation inside a fused kernel, as eager does: without it a fused kernel keeps
    # float32 intermediates, and the small LoRA updates that eager's bf16 rounding drops survive, so the compiled
    # and eager models drift apart as training goes on (measured on an H100: docs/PERFORMANCE.md).
    inductor_config.emulate_precision_casts = True
    # A worker runs job after job in one process: start each run from an empty compile cache (graphs of the last
    # job's model would pile up towards the recompile limit) and with this run's own failure policy.
    torch._dynamo.reset()
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
    # auto: fall back to the eager layer (with the compiler's warning) instead of failing the run; layers: fail.
    dynamo_config.suppress_errors = mode == "auto"
    for layer in layers:
        layer.compile()
    logger.info("compiled %d decoder layers (regional torch.compile)", len(layers))
    return len(layers)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` was compiled in place by ``nn.Module.compile``."""
    return getattr(module, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside the block (for generation's growing cache)."""
    with torch.compiler.set_stance("force_eager"):
        yield
