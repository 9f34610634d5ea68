"""Reference log-prob cache keys (shared/DAMA.md; issue: stale references): a local model folder is identified by
every file that changes its numbers, and the key carries the code version of the log-prob path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dama_engine.config import parse_config
from dama_engine.model_files import CODE_PATHS, code_version, folder_identity
from dama_engine.training.cache import tensor_cache
from dama_engine.training.recipe import _model_identity


class _Processor:
    chat_template = "{{ messages }}"


def _model_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / ".cache").mkdir(parents=True)
    files = {
        "config.json": '{"model_type": "llava"}',
        "tokenizer.json": '{"added_tokens": []}',
        "tokenizer_config.json": "{}",
        "preprocessor_config.json": '{"size": 30}',
        "chat_template.jinja": "{{ messages }}",
        "pytorch_model.bin": "weights",
        ".cache/download.lock": "ignored",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_editing_any_model_file_recomputes_the_reference_and_an_unchanged_folder_reuses_it(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    config = parse_config({"model": {"name_or_path": str(folder)}, "data": {"train": "t.jsonl"}})
    computed: list[int] = []

    def reference() -> torch.Tensor:
        computed.append(1)
        return torch.zeros(2, 2)

    def run() -> None:
        key = {"rows": "same rows", "model": _model_identity(config, _Processor(), bf16=False, commit=None)}
        tensor_cache(tmp_path / "cache", "reference", key, reference)

    run()
    run()
    assert len(computed) == 1  # unchanged folder: reused
    stat = (folder / "tokenizer.json").stat()
    (folder / "tokenizer.json").write_text('{"added_tokens": [1]}')
    os.utime(folder / "tokenizer.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time: content decides
    run()
    assert len(computed) == 2
    for name in ("chat_template.jinja", "preprocessor_config.json", "config.json", "pytorch_model.bin"):
        (folder / name).write_text((folder / name).read_text() + " ")
        run()
    assert len(computed) == 6
    (folder / ".cache" / "download.lock").write_text("changed")  # hidden: never the model's numbers
    run()
    assert len(computed) == 6


def test_large_files_are_identified_by_size_and_time(tmp_path: Path, monkeypatch: Any) -> None:
    folder = _model_folder(tmp_path)
    monkeypatch.setattr("dama_engine.model_files.CONTENT_HASH_MAX_BYTES", 4)
    before = dict((name, mark) for name, _, mark in folder_identity(folder) or [])
    assert before["pytorch_model.bin"].startswith("mtime:")
    os.utime(folder / "pytorch_model.bin", ns=(1, 1))
    after = dict((name, mark) for name, _, mark in folder_identity(folder) or [])
    assert after["pytorch_model.bin"] != before["pytorch_model.bin"]
    assert folder_identity(tmp_path / "missing") is None  # a hub name: its commit identifies it


def test_the_code_version_covers_the_log_prob_path() -> None:
    assert "dama_engine.forward.logprobs" in CODE_PATHS["reference"]
    assert "dama_engine.forward.packing" in CODE_PATHS["reference"]
    assert code_version("reference") == code_version("reference")
    assert code_version("reference") != code_version("hardness")


def test_the_starting_adapter_is_part_of_the_reference_key(tmp_path: Path) -> None:
    """Same base, another ``model.init_adapter`` (shared/DAMA.md 4b): another reference. The key follows the
    adapter's config and weights, not its folder or its model card; no adapter keeps the plain base's key."""
    folder = _model_folder(tmp_path)

    def adapter(name: str, weights: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text('{"r": 4}')
        (path / "adapter_model.safetensors").write_text(weights)
        (path / "README.md").write_text(f"# {name}")
        return path

    def key(init_adapter: Path | None) -> dict[str, Any]:
        model: dict[str, Any] = {"name_or_path": str(folder)}
        if init_adapter is not None:
            model["init_adapter"] = str(init_adapter)
        config = parse_config({"model": model, "data": {"train": "t.jsonl"}})
        return _model_identity(config, _Processor(), bf16=False, commit=None)

    first, second, copy = adapter("first", "weights 1"), adapter("second", "weights 2"), adapter("copy", "weights 1")
    plain = key(None)
    assert "init_adapter" not in plain
    assert len({repr(plain), repr(key(first)), repr(key(second))}) == 3
    assert key(copy) == key(first)  # the same adapter in another folder (a job's own copy of it)
    (first / "README.md").write_text("# first, with an evaluation appended")
    assert key(first) == key(copy)
    (first / "adapter_config.json").write_text('{"r": 8}')
    assert key(first) != key(copy)
