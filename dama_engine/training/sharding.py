"""``distributed.strategy: fsdp``: the model, its gradients and optimizer states sharded over the ranks (FSDP2).

:func:`shard_model` applies PyTorch's ``fully_shard`` to each decoder layer of the language model (and to each
layer of the vision tower when the vision tower trains), then to the root, which keeps the rest (embeddings,
projector, a frozen vision tower, final norm, output head) as one unit. It works the same for LoRA (the frozen
base and the adapter share each layer's unit: FSDP2 all-gathers both and reduce-scatters only the gradients that
exist) and for full fine-tuning. On CUDA with bf16 the parameters are all-gathered in bf16 and the gradients
reduced in float32 (``MixedPrecisionPolicy``); on a CPU everything stays float32.

Why raw ``fully_shard`` and not accelerate's FSDP2 plugin: the recipe already takes only the process group from
accelerate (and DDP through ``prepare``). The plugin picks its units from the model's ``_no_split_modules`` names,
keeps its settings in accelerate's process-wide state (a worker runs job after job in one process; see the
mixed-precision note in :mod:`dama_engine.training.recipe`), and saves through ``save_state`` in a layout of its
own. The engine needs three things it does not give directly: the units chosen from the family registry (the
same layers regional compiling uses, :func:`dama_engine.forward.decoder_layers`), its own checkpoint contents
(objective state, RNG streams, the filtering generator, a gathered PEFT ``adapter/``) beside the shards, and a
state dict it can gather to rank 0 in PEFT's names. Raw ``fully_shard`` plus ``torch.distributed.checkpoint`` is
that in about a hundred lines.

What runs where under ``fsdp``:

* the reference pass runs before sharding, exactly as under DDP (rank 0 computes, the cache is shared and keyed
  the same): it needs the weights only, no gradients or optimizer states, so a model whose training state needs
  sharding still runs it on one GPU (13B: 26 GB in bf16 for LoRA, 53 GB in float32, the master weights of a full
  fine-tune);
* held-out evaluations during training run on every rank in step (every rank scores all the held-out pairs: the
  sharded forward needs every rank), rank 0 records them;
* checkpoints: every rank writes its shard of the trainable weights and optimizer states with
  ``torch.distributed.checkpoint`` (:func:`save_sharded`, :func:`load_sharded`: exact resume), and the trainable
  weights are gathered to rank 0 for the PEFT ``adapter/`` a LoRA checkpoint keeps;
* after training the trainable weights are gathered once (:func:`gathered_state_dict`) and exported as today;
  the evaluation after training then loads that export on rank 0 (gather first, the simplest).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dama_engine.forward import decoder_layers
from dama_engine.models import family_for, unwrap_model

SHARDED_DIR = "sharded"  # a checkpoint's torch.distributed.checkpoint folder (one file per rank)


def shard_model(model: torch.nn.Module, device: torch.device, *, bf16: bool) -> int:
    """Shard ``model`` in place over every rank of the process group; return the number of units.

    Units: each decoder layer, each vision-tower layer when any vision-tower weight trains, then the root."""
    world_size = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world_size,))
    if device.type == "cuda" and bf16:
        # bf16 all-gathers and compute (half the traffic), float32 gradient reductions (no rounding in the sum).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    units = [*_trained_vision_layers(model), *decoder_layers(model)]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return len(units) + 1


def _trained_vision_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The vision tower's repeated layers (its longest module list) when any of its weights trains; else none."""
    base = unwrap_model(model)
    family = family_for(base)
    trains = any(p.requires_grad for name, p in base.named_parameters() if family.is_vision_tower_param(name))
    if not trains:
        return []
    lists: list[torch.nn.ModuleList] = [
        module
        for prefix in family.vision_tower_prefixes
        if _has_submodule(base, prefix)
        for module in base.get_submodule(prefix).modules()
        if isinstance(module, torch.nn.ModuleList)
    ]
    longest = max(lists, key=lambda layers: sum(1 for _ in layers), default=None)
    return list(longest) if longest is not None else []


def _has_submodule(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def is_sharded(model: Any) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync_off(model: FSDPModule) -> Iterator[None]:
    """Gradient accumulation: keep the micro-batch's gradients unsharded and unreduced (FSDP2's ``no_sync``)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


_TRAINABLE = StateDictOptions(ignore_frozen_params=True)


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the trainable weights and the optimizer states to ``path/sharded``
    (a collective: all ranks call it)."""
    state = {
        "model": get_model_state_dict(model, options=_TRAINABLE),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=_TRAINABLE),
    }
    dcp.save(state, checkpoint_id=path / SHARDED_DIR)


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the shards :func:`save_sharded` wrote back into the sharded ``model`` and ``optimizer`` in place
    (a collective). The optimizer's states are created first (a zero step with learning rate 0), then filled."""
    weights = get_model_state_dict(model, options=_TRAINABLE)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_TRAINABLE)
    dcp.load({"model": weights, "optimizer": optimizer_state}, checkpoint_id=path / SHARDED_DIR)  # in place
    set_model_state_dict(model, weights, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_TRAINABLE)


def gathered_state_dict(model: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights on rank 0's CPU, in the model's own names; an empty dict on the other ranks
    (a collective). ``trainable_only``: the adapter and other trained weights, else every weight (a full
    fine-tune's export)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    gathered = get_model_state_dict(model, options=options)
    return {name: value for name, value in gathered.items() if isinstance(value, torch.Tensor)}
