"""Content-addressed on-disk caches for per-dataset results (reference log-probs, data hardness).

A cache entry's name is the sha256 of everything its value depends on, so a changed dataset, model, chat
template or scorer never reuses a stale entry, and the same inputs never compute twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dama_engine.data import PreferenceRow


def rows_fingerprint(rows: Sequence[PreferenceRow]) -> str:
    """sha256 over every row's id, prompt, answers, scores and image bytes."""
    digest = hashlib.sha256()
    for row in rows:
        fields = [row.row_id, json.dumps(row.prompt_chat()), row.chosen, row.rejected]
        fields += [repr(row.chosen_score), repr(row.rejected_score), repr(row.hardness)]
        for text in fields:
            digest.update(text.encode())
            digest.update(b"\x00")
        for image in row.images:
            digest.update(hashlib.sha256(image.read_bytes()).digest())
        digest.update(b"\x01")
    return digest.hexdigest()


def cache_key(values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def tensor_cache(
    cache_dir: Path, kind: str, key: Any, compute: Callable[[], torch.Tensor], accelerator: Any = None
) -> torch.Tensor:
    """Load ``cache_dir/<kind>-<sha>.pt`` or compute and store it. With several processes, the main process
    computes and writes; the others wait and read."""
    path = cache_dir / f"{kind}-{cache_key(key)[:32]}.pt"
    is_main = accelerator is None or accelerator.is_main_process
    if is_main and not path.is_file():
        value = compute()
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(value, partial)
        partial.replace(path)  # atomic: a reader never sees half a file
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return torch.load(path, weights_only=True)
