"""Supervised fine-tuning (``method: sft``, shared/DAMA.md section 4b): the loss, the step, the run end to end
(no reference pass, progress, held-out metrics, checkpoints and exact resume, export), answer-only rows."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dama_engine.config import TrainConfig, apply_overrides, parse_config
from dama_engine.data.formats import load_and_validate
from dama_engine.data.validation import DataError
from dama_engine.forward.batching import PairEncoder, collate_pairs
from dama_engine.forward.logprobs import pair_log_probs
from dama_engine.objective.loss import ObjectiveConfig, ObjectiveState, preference_loss, sft_loss
from dama_engine.proving.demo import prepare_demo
from dama_engine.training.recipe import train
from dama_engine.training.step import StepSetup, train_step
from tests.engine.test_step import parts as parts  # the module-scoped fixture
from tests.engine.test_trainer import Recorder

SFT = ["objective.method=sft", "optim.learning_rate=1e-3", "evaluation.enabled=false"]


def test_sft_loss_is_the_mean_nll_per_answer_token() -> None:
    logps = torch.tensor([-6.0, -2.0, -9.0], requires_grad=True)
    tokens = torch.tensor([3, 1, 2])
    out = sft_loss(logps, tokens, state=ObjectiveState(reward_gap_mean=0.7, reward_gap_std=2.0, steps=4))
    assert out.loss.item() == pytest.approx(17.0 / 6.0)
    out.loss.backward()
    assert logps.grad is not None
    torch.testing.assert_close(logps.grad, torch.full((3,), -1.0 / 6.0))  # every token weighs the same
    torch.testing.assert_close(out.losses, torch.tensor([2.0, 2.0, 4.5]))
    assert out.metrics["nll_per_token"] == pytest.approx(17.0 / 6.0)
    assert out.metrics["answer_tokens"] == 6
    # The preference statistics pass through untouched.
    assert out.state == ObjectiveState(reward_gap_mean=0.7, reward_gap_std=2.0, steps=5)


def test_preference_loss_refuses_sft() -> None:
    values = torch.zeros(2)
    with pytest.raises(ValueError, match="sft_loss"):
        preference_loss(values, values, values, values, config=ObjectiveConfig(method="sft"))


def test_sft_step_with_accumulation_equals_one_big_micro_batch(parts: dict[str, Any]) -> None:
    """Token-weighted: four micro-batches of one pair step exactly as one micro-batch of four."""
    pairs, pad = parts["pairs"], parts["pad"]

    def step(micro_batches: list[Any]) -> tuple[list[torch.Tensor], dict[str, float]]:
        model = copy.deepcopy(parts["model"])
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=0.1)
        setup = StepSetup(
            model=model,
            parameters=parameters,
            optimizer=optimizer,
            scheduler=None,
            objective=ObjectiveConfig(method="sft", filter_scope="step"),
            reference=torch.full((4, 2), float("nan")),  # never read by sft
            hardness=None,
            hardness_mean=None,
            generator=torch.Generator().manual_seed(0),
            device=torch.device("cpu"),
        )
        before = [p.detach().clone() for p in parameters]
        result = train_step(setup, micro_batches, ObjectiveState(), log=True)
        assert result.metrics is not None and result.state == ObjectiveState(steps=1)
        return [p.detach() - b for p, b in zip(parameters, before, strict=True)], result.metrics

    whole_update, whole = step([collate_pairs(pairs, pad)])
    split_update, split = step([collate_pairs([pair], pad) for pair in pairs])

    batch = collate_pairs(pairs, pad)
    with torch.no_grad():
        chosen, _ = pair_log_probs(copy.deepcopy(parts["model"]), batch)
    tokens = sum(len(pair.chosen_ids) for pair in pairs)
    assert whole["loss"] == pytest.approx(-float(chosen.sum()) / tokens, rel=1e-5)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert any(u.abs().max() > 0 for u in whole_update)
    for got, want in zip(split_update, whole_update, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return prepare_demo(tmp_path_factory.mktemp("sft-demo"), n_train=32, n_eval=8).model_dump()


def _config(base: dict[str, Any], output_dir: Path, *overrides: str) -> TrainConfig:
    values = json.loads(json.dumps(base))
    values["run"]["output_dir"] = str(output_dir)
    return parse_config(apply_overrides(values, [*SFT, *overrides]))


def _lines(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_sft_run_learns_checkpoints_resumes_exactly_and_exports(demo: dict[str, Any], tmp_path: Path) -> None:
    overrides = ["optim.batch_size=8", "optim.max_steps=4", "run.checkpoint_every=2", "run.eval_every=2"]
    recorder = Recorder()
    whole = train(_config(demo, tmp_path / "a", *overrides), recorder)
    # No reference pass, no scoring work; the usual progress otherwise.
    assert "reference" not in recorder.stages
    assert recorder.stages[-2:] == ["evaluating", "exporting"] and recorder.steps == [1, 2, 3, 4]
    lines = _lines(tmp_path / "a")
    train_lines = [line for line in lines if "loss" in line]
    assert {"loss", "nll_per_token", "answer_tokens", "grad_norm", "lr"} <= set(train_lines[0])
    held_out = [line for line in lines if "eval_loss" in line]
    assert [line["step"] for line in held_out] == [0, 2, 4]
    # Learning: the held-out NLL per token of the preferred answers goes down.
    assert held_out[-1]["eval_nll_per_token"] < held_out[0]["eval_nll_per_token"] - 0.05
    assert whole.adapter_dir is not None and (whole.adapter_dir / "adapter_model.safetensors").is_file()
    assert "`sft`" in (whole.adapter_dir / "README.md").read_text()

    # Stopped after step 2 (a checkpoint) and resumed: the same adapter, bit for bit.
    config = _config(demo, tmp_path / "b", *overrides)
    stopped = train(config, Recorder(stop_at=2))
    assert stopped.stopped and stopped.steps == 2
    resumed = train(config)
    assert resumed.steps == 4 and resumed.adapter_dir is not None
    first, second = (
        load_file(whole.adapter_dir / "adapter_model.safetensors"),
        load_file(resumed.adapter_dir / "adapter_model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def _prompt_completion_file(tmp_path: Path, demo: dict[str, Any]) -> Path:
    """The demo's training pairs rewritten in TRL's prompt/completion form (the chosen answer only)."""
    rows = [json.loads(line) for line in Path(demo["data"]["train"]).read_text().splitlines() if line]
    folder = Path(demo["data"]["train"]).parent
    out = folder / "completions.jsonl"
    with out.open("w") as handle:
        for row in rows:
            record = {key: value for key, value in row.items() if key not in ("chosen", "rejected", "hardness")}
            handle.write(json.dumps({**record, "completion": row["chosen"]}) + "\n")
    return out


def test_prompt_completion_rows_train_with_sft_and_are_refused_by_preference_methods(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    data = _prompt_completion_file(tmp_path, demo)
    rows, report = load_and_validate(data)
    assert report.ok and rows and all(row.answer_only and row.rejected == "" for row in rows)

    result = train(
        _config(
            demo, tmp_path / "sft", f"data.train={data}", f"data.eval={data}", "optim.batch_size=8", "optim.max_steps=2"
        )
    )
    assert result.steps == 2 and result.adapter_dir is not None
    # Held-out rows with one answer each have no pair: no log-prob accuracy at all (never a 0 by construction).
    assert result.eval_before is not None and result.eval_after is not None
    assert "eval_logp_accuracy" not in result.eval_before and "eval_logp_accuracy" not in result.eval_after

    with pytest.raises(DataError, match=r"data\.train: .* carry only an answer .*method dpo"):
        train(_config(demo, tmp_path / "dpo", f"data.train={data}", "objective.method=dpo", "optim.max_steps=2"))


def test_sft_batches_carry_no_rejected_answer(demo: dict[str, Any]) -> None:
    """sft encodes the preferred answer only: the rejected answer is the template's empty turn."""
    from dama_engine.data.rows import answer_only
    from dama_engine.models.loading import load_processor

    config = _config(demo, Path("unused"))
    rows, _ = load_and_validate(config.data.train or "")
    encoder = PairEncoder(load_processor(config.model), max_length=config.data.max_length)
    full, single = encoder.encode(rows[0]), encoder.encode(answer_only(rows[0]))
    assert single.chosen_ids == full.chosen_ids
    assert len(single.rejected_ids) < len(full.rejected_ids)
