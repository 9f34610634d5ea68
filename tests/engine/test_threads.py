"""Torch's thread count is a deliberate setting (dama_engine.threads): run.threads, else DAMA_TORCH_THREADS, else 1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dama_engine.config import ConfigError, load_config
from dama_engine.threads import ENV_VAR, apply_threads, resolve_threads


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_setting_wins_then_the_environment_then_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_threads() == 1
    monkeypatch.setenv(ENV_VAR, "2")
    assert resolve_threads() == 2
    assert resolve_threads(3) == 3
    assert apply_threads() == 2 and torch.get_num_threads() == 2
    assert apply_threads(1) == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("raw", ["0", "-1", "two"])
def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(ENV_VAR, raw)
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_threads()


def test_run_threads_is_checked_in_the_config(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\n")
    assert load_config(config_file, ["run.threads=2"]).run.threads == 2
    with pytest.raises(ConfigError, match=r"run\.threads"):
        load_config(config_file, ["run.threads=0"])
