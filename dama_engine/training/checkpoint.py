"""Resumable checkpoints: everything an exact resume needs, in one folder per step.

``checkpoints/step-000012/`` holds the trained weights (``trainable.safetensors``), the same weights as a PEFT
adapter folder (``adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(base, folder)``; LoRA runs only), ``optimizer.pt``,
``scheduler.pt``, ``state.json`` (optimizer step, objective state, filter-generator state digest) and one
``rng-rank<R>.pt`` per process (python, numpy, torch, CUDA and the filtering generator's states). The data
position needs no file: the order of every epoch is a pure function of the seed and the epoch.

Under ``distributed.strategy: fsdp`` the weights and optimizer states are sharded: ``sharded/`` (written by every
rank through ``torch.distributed.checkpoint``, :mod:`dama_engine.training.sharding`) replaces
``trainable.safetensors`` and ``optimizer.pt``; ``adapter/`` is gathered from the shards, so it is the same PEFT
folder as under DDP. A checkpoint resumes only under the strategy that wrote it.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dama_engine.models import is_peft
from dama_engine.objective import ObjectiveState
from dama_engine.training.sharding import (
    SHARDED_DIR,
    gathered_state_dict,
    is_sharded,
    load_sharded,
    save_sharded,
)

_PREFIX = "step-"
ADAPTER_DIR = "adapter"


@dataclass
class TrainingState:
    """The counters and running statistics restored on resume."""

    step: int
    objective: ObjectiveState


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"{_PREFIX}{step:06d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (one whose ``state.json`` was written last, after everything else)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file())
    return done[-1] if done else None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "filter_generator": generator.get_state(),
    }


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["filter_generator"])


def save_checkpoint(
    *,
    output_dir: Path,
    state: TrainingState,
    trainable: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    rank: int,
    is_main: bool,
    keep: int,
    barrier: Callable[[], None] = lambda: None,
    model: torch.nn.Module | None = None,
) -> Path:
    """Write a checkpoint (rank 0 writes the shared files, every rank its RNG file); prune old ones.

    ``barrier`` waits for every rank (``accelerator.wait_for_everyone``): ``state.json``, which marks the
    checkpoint complete, is written only once every rank's RNG file is on disk. ``model`` (the PEFT model, not
    its DDP wrapper) adds the ``adapter/`` folder, so any kept checkpoint can be served as an adapter without torch.
    A sharded ``model`` (``fsdp``) is saved by every rank (call this on all of them); ``trainable`` is then unused.
    """
    path = checkpoint_dir(output_dir, state.step)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(generator), path / f"rng-rank{rank}.pt")
    sharded = model is not None and is_sharded(model)
    gathered: dict[str, torch.Tensor] | None = None
    if sharded:
        assert model is not None
        save_sharded(path, model, optimizer)
        if is_peft(model):  # the adapter/ folder: the trained weights gathered to rank 0
            gathered = gathered_state_dict(model, trainable_only=True)
    barrier()
    if is_main:
        if not sharded:
            assert trainable is not None
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, path / "trainable.safetensors")
            torch.save(optimizer.state_dict(), path / "optimizer.pt")
        torch.save(scheduler.state_dict(), path / "scheduler.pt")
        if model is not None:
            save_checkpoint_adapter(model, path, state_dict=gathered)
        # state.json last: its presence marks the checkpoint complete.
        (path / "state.json").write_text(
            json.dumps({"step": state.step, "objective": state.objective.to_dict()}, indent=2)
        )
        done = sorted(p for p in path.parent.iterdir() if p.name.startswith(_PREFIX))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_checkpoint_adapter(
    model: torch.nn.Module, path: Path, *, state_dict: dict[str, torch.Tensor] | None = None
) -> Path | None:
    """Write the model's trainable adapter as a PEFT folder under the checkpoint; None for a full fine-tune (its
    training state is the whole model, served by no adapter route). ``state_dict``: the trained weights gathered
    from a sharded model (:func:`dama_engine.training.sharding.gathered_state_dict`)."""
    if not is_peft(model):
        return None
    adapter_dir = path / ADAPTER_DIR
    model.save_pretrained(adapter_dir, state_dict=state_dict)  # type: ignore[operator]
    return adapter_dir


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    rank: int,
) -> TrainingState:
    """Restore weights, optimizer, scheduler and RNG states in place; return the counters. A sharded ``model``
    (``fsdp``; every rank calls this) reads the checkpoint's shards."""
    written_sharded = (path / SHARDED_DIR).is_dir()
    if written_sharded != is_sharded(model):
        written, running = ("fsdp", "ddp") if written_sharded else ("ddp", "fsdp")
        raise ValueError(
            f"checkpoint {path} was written under distributed.strategy {written}; this run uses {running}: "
            f"resume with distributed.strategy {written}, or start in a new run.output_dir"
        )
    if written_sharded:
        load_sharded(path, model, optimizer)
    else:
        _load_trainable(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False), generator)
    values = json.loads((path / "state.json").read_text())
    return TrainingState(step=checkpoint_step(path), objective=ObjectiveState.from_dict(values["objective"]))


def _load_trainable(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    saved = load_file(path / "trainable.safetensors")
    parameters = dict(model.named_parameters())
    missing = [name for name in saved if name not in parameters]
    if missing:
        raise ValueError(f"checkpoint {path} does not fit this model: unknown tensors {missing[:3]}")
    with torch.no_grad():
        for name, value in saved.items():
            parameters[name].copy_(value.to(parameters[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))


def checkpoint_step(path: Path) -> int:
    """The optimizer step a complete checkpoint folder was saved after (its ``state.json``)."""
    return int(json.loads((path / "state.json").read_text())["step"])
