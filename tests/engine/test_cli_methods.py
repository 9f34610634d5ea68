"""``dama-train CONFIG.yaml`` as a user runs it, for every method, with the progress bar on: each step's line shows
that method's own metrics (an sft step has no reward margin), and the adapter is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dama_engine.proving.demo import prepare_demo

METHODS = ("sft", "dpo", "beta_dpo", "dama")


def _command() -> list[str]:
    script = Path(sys.executable).parent / "dama-train"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dama_engine.cli"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """The four runs, started together (each a fresh process: about 10 s of imports apiece)."""
    root = tmp_path_factory.mktemp("cli")
    base = prepare_demo(root / "demo", n_train=16, n_eval=8).model_dump(mode="json")
    env = {**os.environ, "DAMA_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = {}
    for method in METHODS:
        values = json.loads(json.dumps(base))
        values["objective"]["method"] = method
        values["optim"].update(batch_size=4, max_steps=3)
        values["run"].update(output_dir=str(root / method), eval_every=2, checkpoint_every=None)
        values["evaluation"]["enabled"] = False
        config = root / f"{method}.yaml"
        config.write_text(yaml.safe_dump(values))
        process = subprocess.Popen(
            [*_command(), str(config)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started[method] = (process, root / method)
    finished = {}
    for method, (process, output) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        finished[method] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), output)
    return finished


@pytest.mark.parametrize("method", METHODS)
def test_dama_train_runs_every_method(
    method: str, runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]
) -> None:
    result, output = runs[method]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    assert (output / "adapter" / "adapter_config.json").is_file()
    bar = result.stderr
    assert "training: 100%" in bar and "3/3" in bar, bar[-2000:]
    assert "loss=" in bar
    if method == "sft":
        assert "margin=" not in bar and "tokens=" in bar  # no reward without a reference
        assert "held-out @ step 2" in bar and ", loss " in bar
    else:
        assert "margin=" in bar and "acc=" in bar and "beta=" in bar
        assert "held-out @ step 2: log-prob accuracy" in bar
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
