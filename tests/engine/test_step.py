"""One optimizer step (dama_engine.training.step.train_step): the step filter scope, the filter-group guard, host
syncs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.cli.train import train_main
from dama_engine.config import ConfigError, LoraSection, parse_config
from dama_engine.forward.batching import PairBatch, PairEncoder, collate_pairs
from dama_engine.forward.logprobs import pair_log_probs
from dama_engine.models.loading import make_trainable
from dama_engine.objective.loss import ObjectiveConfig, ObjectiveState
from dama_engine.training.host_syncs import count_host_syncs
from dama_engine.training.recipe import check_filter_group
from dama_engine.training.step import StepSetup, train_step
from tests.engine.conftest import make_row

ANSWERS = [
    ("A red circle.", "A blue square and a green star."),
    ("Two yellow triangles.", "A cat on a mat."),
    ("A green square.", "A green circle."),
    ("Nothing at all.", "A dog, a bird and a tree."),
]


class _RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradients it was stepped with."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure: Any = None) -> Any:
        self.seen.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


@pytest.fixture(scope="module")
def parts(tiny_models: dict[str, Any]) -> dict[str, Any]:
    path = tiny_models["llava"]
    processor = AutoProcessor.from_pretrained(path)
    model = make_trainable(AutoModelForImageTextToText.from_pretrained(path), LoraSection(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at zero; a random B gives every LoRA matrix a gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    encoder = PairEncoder(processor, max_length=512)
    colours = [(220, 20, 20), (240, 240, 20), (20, 200, 20), (20, 20, 220)]
    pairs = [encoder.encode(make_row(i, *ANSWERS[i], colours[i]), i) for i in range(4)]
    return {"model": model.train(), "pairs": pairs, "pad": processor.tokenizer.pad_token_id}


def _setup(model: Any, config: ObjectiveConfig) -> StepSetup:
    parameters = [p for p in model.parameters() if p.requires_grad]
    reference = torch.tensor([[-40.0, -43.0], [-52.0, -50.5], [-35.0, -36.0], [-47.0, -41.0]])
    return StepSetup(
        model=model,
        parameters=parameters,
        optimizer=_RecordingSGD(parameters, lr=0.1),
        scheduler=None,
        objective=config,
        reference=reference,
        hardness=torch.tensor([0.3, -0.2, 0.05, 0.6]),
        hardness_mean=0.1,
        generator=torch.Generator().manual_seed(11),
        device=torch.device("cpu"),
        max_grad_norm=None,
    )


def _step(parts: dict[str, Any], config: ObjectiveConfig, micro_batches: list[PairBatch]) -> dict[str, Any]:
    setup = _setup(copy.deepcopy(parts["model"]), config)
    start = ObjectiveState(reward_gap_mean=0.5, reward_gap_std=1.0, steps=3)
    result = train_step(setup, micro_batches, start, log=True)
    return {
        "keep": torch.cat([o.keep_mask for o in result.outputs]),
        "beta": torch.cat([o.beta for o in result.outputs]),
        "losses": torch.cat([o.losses.detach() for o in result.outputs]),
        "grads": setup.optimizer.seen[0],  # type: ignore[attr-defined]
        "state": result.state,
        "metrics": result.metrics,
    }


def test_step_scope_with_accumulation_equals_one_big_micro_batch(parts: dict[str, Any]) -> None:
    """Batch 1 x accumulation 4 under filter_scope step = batch 4 x accumulation 1 (DAMA.md section 2.5)."""
    config = ObjectiveConfig(method="dama", keep_ratio=0.5, filter_scope="step")
    pairs, pad = parts["pairs"], parts["pad"]
    whole = _step(parts, config, [collate_pairs(pairs, pad)])
    split = _step(parts, config, [collate_pairs([pair], pad) for pair in pairs])

    assert int(whole["keep"].sum()) == 2  # one draw of K = floor(0.5 x 4) over the step's four pairs
    assert torch.equal(split["keep"], whole["keep"])
    torch.testing.assert_close(split["beta"], whole["beta"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(split["losses"], whole["losses"], rtol=1e-5, atol=1e-7)
    assert split["metrics"]["loss"] == pytest.approx(whole["metrics"]["loss"], rel=1e-5)
    assert split["metrics"]["alpha_m"] == pytest.approx(whole["metrics"]["alpha_m"], rel=1e-5)
    assert split["metrics"]["kept"] == whole["metrics"]["kept"] == 2
    assert split["state"].reward_gap_mean == pytest.approx(whole["state"].reward_gap_mean, rel=1e-5)
    assert split["state"].reward_gap_std == pytest.approx(whole["state"].reward_gap_std, rel=1e-5)
    assert any(g.abs().max() > 0 for g in whole["grads"])
    for got, want in zip(split["grads"], whole["grads"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_micro_batch_scope_filters_each_micro_batch(parts: dict[str, Any]) -> None:
    """The default: each micro-batch of 2 is its own group, so one pair of each is kept."""
    config = ObjectiveConfig(method="dama", keep_ratio=0.5)
    pairs, pad = parts["pairs"], parts["pad"]
    result = _step(parts, config, [collate_pairs(pairs[:2], pad), collate_pairs(pairs[2:], pad)])
    assert result["keep"][:2].sum() == 1 and result["keep"][2:].sum() == 1
    assert result["metrics"]["kept"] == 2


def test_a_non_logging_step_reads_the_device_once_beyond_the_model(parts: dict[str, Any]) -> None:
    """Host syncs in the step path: one (the merged running statistics) besides the model's own forward."""
    pairs, pad = parts["pairs"], parts["pad"]
    micro_batches = [collate_pairs(pairs[:2], pad), collate_pairs(pairs[2:], pad)]
    model = copy.deepcopy(parts["model"])
    with count_host_syncs() as forward_only, torch.no_grad():
        pair_log_probs(model, micro_batches[0])
    setup = _setup(model, ObjectiveConfig(method="dama", keep_ratio=1.0))
    setup.optimizer = torch.optim.SGD(setup.parameters, lr=0.1)  # its step reads no tensor back
    with count_host_syncs() as step:
        train_step(setup, micro_batches, ObjectiveState(), log=False)
    assert step.total == 2 * forward_only.total + 1, (dict(step.by_kind), dict(forward_only.by_kind))
    with count_host_syncs() as logging_step:
        train_step(setup, micro_batches, ObjectiveState(), log=True)
    assert logging_step.total == 2 * forward_only.total + 2  # and the metrics, in one read


def _config(**optim: Any) -> Any:
    return parse_config(
        {
            "model": {"name_or_path": "unused"},
            "data": {"train": "unused"},
            "optim": optim,
            "objective": {"filter_scope": optim.pop("filter_scope", "micro_batch")},
        }
    )


def test_a_filter_group_below_two_kept_pairs_is_refused_naming_both_fixes() -> None:
    with pytest.raises(ConfigError, match=r"filter_scope: step.*batch size"):
        check_filter_group(_config(batch_size=1, grad_accumulation=4), processes=1)
    check_filter_group(_config(batch_size=1, grad_accumulation=4), processes=4)  # 4 ranks: floor(0.8 x 4) = 3
    check_filter_group(_config(batch_size=1, grad_accumulation=4, filter_scope="step"), processes=1)
    with pytest.raises(ConfigError, match=r"gradient accumulation"):
        check_filter_group(_config(batch_size=1, grad_accumulation=2, filter_scope="step"), processes=1)


def test_the_cli_refuses_a_filter_group_of_one_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DAMA_PROVING_DIR", str(tmp_path / "proving"))
    code = train_main(
        [
            "--demo",
            "--output-dir",
            str(tmp_path / "run"),
            "optim.batch_size=1",
            "optim.grad_accumulation=4",
            "objective.method=dama",
        ]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "filter_scope: step" in message and "batch size" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "proving").exists()  # refused before the demo's proving ground is built
