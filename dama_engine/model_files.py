"""What identifies a model's numbers, for cache keys: every file of a local model folder, and the code version
of the paths that compute cached values (reference log-probs, data hardness).

A local folder is identified by all its files (config, tokenizer files, processor and preprocessor configs, chat
templates, weights in any format): small files by their content hash, large ones (weights) by name, size and
``mtime_ns``, so a rewritten shard counts as changed without reading gigabytes per run. Hidden entries (``.git``,
``.cache``) are skipped: they never change what the model computes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

# Files up to this size are hashed by content (every config, tokenizer and template); above, by size and time.
CONTENT_HASH_MAX_BYTES = 64 * 1024 * 1024

# The modules whose code decides each cached value; editing any of them changes the cache key.
CODE_PATHS: dict[str, tuple[str, ...]] = {
    "reference": (
        "dama_engine.forward.logprobs",
        "dama_engine.forward.packing",
        "dama_engine.forward.batching",
        "dama_engine.models.loading",
        "dama_engine.models.families",
    ),
    "hardness": ("dama_engine.objective.hardness", "dama_engine.objective.scoring"),
    # The seeing base's recipe: its data, its model and the supervised step it trains with.
    "seeing_base": (
        "dama_engine.proving.seeing_base",
        "dama_engine.proving.shapes",
        "dama_engine.models.tiny",
        "dama_engine.objective.loss",
        "dama_engine.training.step",
    ),
    # The proving ground's on-policy pairs (dama_engine.proving.ground) and its held-out scenes.
    "proving_pairs": (
        "dama_engine.proving.on_policy",
        "dama_engine.proving.shapes",
        "dama_engine.forward.generation",
        "dama_engine.data.matcher",
    ),
    "scenes": ("dama_engine.proving.shapes",),
}


def folder_identity(path: Path) -> list[tuple[str, int, str]] | None:
    """``(relative name, size, content sha256 or "mtime:<ns>")`` of every file under a model folder, sorted;
    None when ``path`` is not a folder (a hub name)."""
    if not path.is_dir():
        return None
    identity = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        stat = file.stat()
        if stat.st_size <= CONTENT_HASH_MAX_BYTES:
            mark = hashlib.sha256(file.read_bytes()).hexdigest()
        else:
            mark = f"mtime:{stat.st_mtime_ns}"
        identity.append((relative.as_posix(), stat.st_size, mark))
    return identity


def code_version(kind: str) -> str:
    """sha256 over the source of the modules listed for ``kind`` in :data:`CODE_PATHS`."""
    digest = hashlib.sha256()
    for module in CODE_PATHS[kind]:
        spec = importlib.util.find_spec(module)
        origin: Any = spec.origin if spec is not None else None
        if origin is None:
            raise RuntimeError(f"cannot find the source of {module} for the cache key")
        digest.update(module.encode() + b"\x00" + Path(origin).read_bytes() + b"\x01")
    return digest.hexdigest()


def stamped(folder: Path, stamp: str, wanted: dict[str, Any], marker: str) -> bool:
    """Whether ``folder`` holds a finished build (``marker`` present) of recipe ``wanted``, as recorded in its
    ``stamp`` file by :func:`write_stamp`."""
    path = folder / stamp
    return path.is_file() and json.loads(path.read_text()) == wanted and (folder / marker).is_file()


def write_stamp(folder: Path, stamp: str, wanted: dict[str, Any]) -> None:
    """Record that ``folder`` was built from recipe ``wanted`` (write it last, once the build is complete)."""
    (folder / stamp).write_text(json.dumps(wanted, indent=2) + "\n")
