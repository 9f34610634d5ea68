"""The training recipe end to end on tiny models: adapter export and reload, metrics, stopping, config errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.callbacks import Callback
from dama_engine.cli.train import train_main
from dama_engine.config import ConfigError, TrainConfig, apply_overrides, load_config, parse_config
from dama_engine.data.formats import load_and_validate
from dama_engine.data.validation import DataError
from dama_engine.forward.batching import PairEncoder, collate_pairs
from dama_engine.proving.demo import prepare_demo
from dama_engine.proving.ground import ProvingGround
from dama_engine.proving.shapes import make_demo_dataset
from dama_engine.training.recipe import train, weights_dtype

SECTION_5_KEYS = {
    "loss",
    "beta_mean",
    "beta_min",
    "beta_max",
    "beta_clamped",
    "alpha_d_mean",
    "alpha_m",
    "kept",
    "reward_gap_mean",
    "rewards_chosen",
    "rewards_rejected",
    "reward_margin",
    "reward_accuracy",
    "logps_policy_chosen",
    "logps_policy_rejected",
    "logps_ref_chosen",
    "logps_ref_rejected",
    "lr",
    "grad_norm",
}


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small demo (model + data) built once; tests derive their configs from it."""
    root = tmp_path_factory.mktemp("demo")
    config = prepare_demo(root, n_train=48, n_eval=16)
    return config.model_dump()


def derive(base: dict[str, Any], output_dir: Path, *overrides: str) -> TrainConfig:
    """The demo config with another output folder; base-vs-tuned evaluation off unless an override turns it on."""
    values = json.loads(json.dumps(base))
    values["run"]["output_dir"] = str(output_dir)
    values["evaluation"]["enabled"] = False
    return parse_config(apply_overrides(values, list(overrides)))


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.stages: list[str] = []
        self.steps: list[int] = []
        self.polls = 0
        self.stop_at = stop_at

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.stages.append(stage)

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.steps.append(step)

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_at is not None and bool(self.steps) and self.steps[-1] >= self.stop_at


def test_train_exports_an_adapter_that_peft_reloads_exactly(demo_base: dict[str, Any], tmp_path: Path) -> None:
    config = derive(
        demo_base,
        tmp_path / "run",
        "optim.max_steps=5",
        "optim.batch_size=8",
        "run.eval_every=2",
        "evaluation.enabled=true",
        "evaluation.max_samples=4",
        "evaluation.max_new_tokens=8",
    )
    recorder = Recorder()
    result = train(config, recorder)

    assert recorder.stages == [
        "validating",
        "loading_model",
        "scoring",
        "reference",
        "evaluating",
        "training",
        "evaluating",
        "exporting",
        "evaluating",  # base against tuned, on the held-out pairs and the generative set
    ]
    assert recorder.steps == [1, 2, 3, 4, 5] and result.steps == 5 and not result.stopped
    adapter = result.adapter_dir
    assert adapter is not None
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "training_config.json"):
        assert (adapter / name).is_file(), name
    assert (adapter / "training_curves.png").stat().st_size > 10_000
    # The config travels with the adapter without this machine's folders: absolute paths cut to their last part.
    shared = json.loads((adapter / "training_config.json").read_text())
    assert str(tmp_path) not in json.dumps(shared) and str(demo_base["model"]["name_or_path"]) not in json.dumps(shared)
    assert shared["model"]["name_or_path"] == Path(demo_base["model"]["name_or_path"]).name
    assert shared["data"]["train"] == Path(demo_base["data"]["train"]).name
    assert shared["optim"] == config.optim.model_dump()
    assert "dama" in (adapter / "README.md").read_text()
    # The demo rows carry their own hardness, used as given (hardness.rescale: none).
    assert (
        "Data hardness from: user-supplied scores, as given (hardness.rescale: none)"
        in (adapter / "README.md").read_text()
    )
    assert "## Base against tuned" in (adapter / "README.md").read_text()
    assert (adapter / "evaluation.png").stat().st_size > 10_000
    evaluation = json.loads((adapter / "evaluation.json").read_text())
    outputs = evaluation["generative"].pop("outputs")  # the per-sample answers, in the adapter's file only
    assert result.evaluation == evaluation
    assert set(evaluation["generative"]["base"]) >= {"chair_s", "chair_i", "coverage"}
    assert evaluation["preference"]["implicit_reward"]["overall"]["count"] == 16
    assert len(outputs) == 4 and all(set(o) >= {"id", "prompt", "objects", "base", "tuned"} for o in outputs)
    assert all(set(o["tuned"]) >= {"response", "hallucinated", "covered", "missed"} for o in outputs)

    # Every step's metrics carry DAMA.md section 5; held-out points are logged too.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5]
    assert set(train_records[0]) >= SECTION_5_KEYS
    held_out = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in held_out] == [0, 2, 4, 5]
    # The policy's own log-prob accuracy at each: before and after training it is the evaluation's base and tuned.
    logp = evaluation["preference"]
    assert held_out[0]["eval_logp_accuracy"] == pytest.approx(logp["base"]["overall"]["logp_accuracy"])
    assert held_out[-1]["eval_logp_accuracy"] == pytest.approx(logp["tuned"]["overall"]["logp_accuracy"])
    assert held_out[-1]["eval_logp_margin"] == pytest.approx(logp["tuned"]["overall"]["logp_margin"], abs=1e-4)

    # Trained weights changed (LoRA B starts at zero), and only LoRA / projector tensors were saved.
    saved = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    assert not any("vision_tower" in k for k in saved)

    # Base model + adapter folder through peft reproduces the trained model's logits exactly.
    base_dir = config.model.name_or_path
    processor = AutoProcessor.from_pretrained(adapter)
    rows, _ = load_and_validate(config.data.eval or "")
    batch = collate_pairs(
        [PairEncoder(processor, max_length=256).encode(row, i) for i, row in enumerate(rows[:3])],
        processor.tokenizer.pad_token_id,
    )
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.model_inputs}
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter).eval()
    reloaded_again = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        first = reloaded(**inputs).logits
        second = reloaded_again(**inputs).logits
        base_logits = AutoModelForImageTextToText.from_pretrained(base_dir).eval()(**inputs).logits
    assert torch.equal(first, second)
    assert not torch.allclose(first, base_logits), "the adapter must change the model"
    trained_metrics = json.loads((adapter / "metrics.json").read_text())
    assert trained_metrics["steps"] == 5


def test_reloaded_adapter_matches_the_in_memory_trained_model(
    demo_base: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exported folder holds exactly the weights the trainer ended with."""
    from dama_engine.training import recipe as trainer_module

    captured: dict[str, Any] = {}
    original = trainer_module.export_adapter

    def capture(**kwargs: Any) -> Path:
        captured["model"] = kwargs["model"]
        return original(**kwargs)

    monkeypatch.setattr(trainer_module, "export_adapter", capture)
    result = train(derive(demo_base, tmp_path / "run", "optim.max_steps=3", "optim.batch_size=8"))
    assert result.adapter_dir is not None
    trained = captured["model"].to("cpu").eval()  # on a CUDA host training ran on the GPU
    base = AutoModelForImageTextToText.from_pretrained(demo_base["model"]["name_or_path"])
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    ids = torch.tensor([[1, 5, 9, 30, 40, 2]])
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_should_stop_is_polled_every_step_and_stops(demo_base: dict[str, Any], tmp_path: Path) -> None:
    recorder = Recorder(stop_at=2)
    result = train(derive(demo_base, tmp_path / "run", "optim.max_steps=6", "optim.batch_size=8"), recorder)
    assert result.stopped and result.steps == 2 and result.adapter_dir is None
    assert recorder.polls >= 2 and "exporting" not in recorder.stages


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_other_families_train(tmp_path: Path, family: str) -> None:
    from dama_engine.models.tiny import build_tiny_model

    data = make_demo_dataset(tmp_path / "data", n_train=16, n_eval=8, n_generative=0, with_hardness=True)
    model_dir = build_tiny_model(family, tmp_path / "model")
    config = parse_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": str(data.train), "eval": str(data.eval), "max_length": 256},
            "optim": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
            "run": {"output_dir": str(tmp_path / "run")},
        }
    )
    result = train(config)
    assert result.steps == 2 and result.adapter_dir is not None
    assert result.eval_after is not None and result.eval_after["eval_pairs"] == 8


def test_full_fine_tune_keeps_the_vision_tower_frozen(demo_base: dict[str, Any], tmp_path: Path) -> None:
    config = derive(demo_base, tmp_path / "run", "lora.enabled=false", "optim.max_steps=2", "optim.batch_size=8")
    result = train(config)
    assert result.adapter_dir is not None
    tuned = load_file(result.adapter_dir / "model.safetensors")
    base = load_file(Path(config.model.name_or_path) / "model.safetensors")
    vision = [k for k in base if "vision_tower" in k]
    language = [k for k in base if "language_model" in k and "layers" in k]
    assert vision and all(torch.equal(base[k], tuned[k]) for k in vision)
    assert any(not torch.equal(base[k], tuned[k]) for k in language)


def test_a_full_fine_tune_in_bf16_keeps_float32_master_weights(demo_base: dict[str, Any], tmp_path: Path) -> None:
    """bf16 compute (autocast, here on the CPU) over float32 weights: updates of the paper's size (lr 5e-7) reach the
    weights, which bf16 weights would round away (Adam's first step moves each weight by about the learning rate,
    far below bf16's spacing at the weights' magnitude)."""
    overrides = ["lora.enabled=false", "model.precision=bf16", "optim.learning_rate=5e-7", "optim.warmup_ratio=0"]
    config = derive(demo_base, tmp_path / "run", *overrides, "optim.max_steps=1", "optim.batch_size=8")
    assert weights_dtype(config, torch.device("cpu")) == torch.float32
    result = train(config)
    assert result.adapter_dir is not None
    tuned = load_file(result.adapter_dir / "model.safetensors")
    base = load_file(Path(config.model.name_or_path) / "model.safetensors")
    layers = [k for k in base if "language_model" in k and "layers" in k and k.endswith("proj.weight")]
    assert layers and all(tuned[k].dtype == torch.float32 for k in layers)
    moved = [k for k in layers if not torch.equal(base[k].float(), tuned[k])]
    assert len(moved) == len(layers)
    # The same step on bf16 weights: the update is lost in rounding for almost every weight.
    for k in layers:
        step = (tuned[k] - base[k].float()).abs()
        kept = (base[k].bfloat16().float() + step).bfloat16().float() != base[k].bfloat16().float()
        assert kept.float().mean() < 0.05, k
    # LoRA keeps the compute dtype for the frozen base; whatever trains is float32: peft's LoRA matrices, and the
    # whole projector it trains beside them (lora.train_projector), which peft would leave in bf16.
    bf16_lora = ["model.precision=bf16", "lora.train_projector=true", "optim.max_steps=1", "optim.batch_size=8"]
    lora = derive(demo_base, tmp_path / "lora", *bf16_lora)
    assert weights_dtype(lora, torch.device("cpu")) == torch.bfloat16
    adapter = train(lora).adapter_dir
    assert adapter is not None
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("projector" in name for name in saved)
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


def test_bad_config_values_name_the_field(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\noptim: {learning_rate: -1}\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: Input should be greater than 0"):
        load_config(config_file)
    with pytest.raises(ConfigError, match=r"objective\.method"):
        load_config(config_file, ["optim.learning_rate=1e-5", "objective.method=ppo"])
    with pytest.raises(ConfigError, match=r"optim\.learnig_rate: Extra inputs are not permitted"):
        load_config(config_file, ["optim.learnig_rate=1e-5"])
    with pytest.raises(ConfigError, match=r"objective\.keep_ratio"):
        load_config(config_file, ["optim.learning_rate=1e-5", "objective.keep_ratio=0"])


def test_cli_stops_on_bad_config_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        f"model: {{name_or_path: m}}\ndata: {{train: t.jsonl}}\nrun: {{output_dir: {tmp_path}/out}}\n"
    )
    assert train_main([str(config_file), "optim.batch_size=0"]) == 2
    assert "optim.batch_size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_rows_stop_the_run_with_row_numbers(tmp_path: Path, demo_base: dict[str, Any]) -> None:
    data_dir = Path(demo_base["data"]["train"]).parent
    train_file = data_dir / f"bad-{tmp_path.name}.jsonl"  # beside the images it references
    record = json.loads(Path(demo_base["data"]["train"]).read_text().splitlines()[0])
    record_bad = dict(record, rejected=record["chosen"])
    train_file.write_text(json.dumps(record) + "\n" + json.dumps(record_bad) + "\n{not json\n")
    config = derive(demo_base, tmp_path / "run", f"data.train={train_file}", "data.eval=")
    with pytest.raises(DataError) as caught:
        train(config)
    rows = sorted(error["row"] for error in caught.value.errors)
    assert rows == [2, 3]


def test_cli_demo_prints_hallucination_and_log_prob_accuracy_before_and_after(
    proving_ground: ProvingGround, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dama-train --demo`` on the proving ground: CHAIR base -> tuned on the held-out scenes and the held-out
    log-prob preference accuracy before -> after, the same numbers as evaluation.json and the held-out evaluations
    during training; never the implicit-reward accuracy as a "before" (0 by construction)."""
    monkeypatch.setenv("DAMA_PROVING_DIR", str(proving_ground.root))
    run = tmp_path / "demo"
    code = train_main(["--demo", "--output-dir", str(run), "optim.max_steps=20", "evaluation.max_samples=20"])
    assert code == 0
    out = capsys.readouterr().out
    evaluation = json.loads((run / "adapter" / "evaluation.json").read_text())
    generative = evaluation["generative"]
    assert "hallucination on 20 held-out images, base -> tuned:" in out
    for name, key in (("CHAIR_i", "chair_i"), ("CHAIR_s", "chair_s"), ("coverage", "coverage")):
        found = re.search(rf"^ +{name} +(\d\.\d{{3}}) -> (\d\.\d{{3}}) ", out, re.MULTILINE)
        assert found, name
        assert float(found[1]) == pytest.approx(generative["base"][key], abs=5e-4)
        assert float(found[2]) == pytest.approx(generative["tuned"][key], abs=5e-4)

    accuracy = r"held-out log-prob preference accuracy \((\d+) pairs.*before (\d\.\d{3}) -> after (\d\.\d{3})"
    found = re.search(accuracy, out)
    assert found and int(found[1]) == sum(1 for line in proving_ground.eval.read_text().splitlines() if line)
    preference = evaluation["preference"]
    assert float(found[2]) == pytest.approx(preference["base"]["overall"]["logp_accuracy"], abs=5e-4)
    assert float(found[3]) == pytest.approx(preference["tuned"]["overall"]["logp_accuracy"], abs=5e-4)
    assert "held-out preference accuracy: before" not in out
    assert "base against tuned:" in out  # the table stays

    # Held-out evaluations during training: eval_every = 20 steps / 8 = 2, each with the policy's log-prob accuracy.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in held_out] == list(range(0, 21, 2))
    assert held_out[0]["eval_logp_accuracy"] == pytest.approx(float(found[2]), abs=5e-4)
    assert held_out[-1]["eval_logp_accuracy"] == pytest.approx(float(found[3]), abs=5e-4)
    assert (run / "adapter" / "training_curves.png").is_file()

    # Each scored scene's answers beside its true objects, for both models.
    scenes = [json.loads(line) for line in proving_ground.generative.read_text().splitlines()[:20]]
    outputs = generative["outputs"]
    assert [o["id"] for o in outputs] == [scene["id"] for scene in scenes]
    assert [o["objects"] for o in outputs] == [scene["objects"] for scene in scenes]
    assert all(o["base"]["response"] and o["tuned"]["response"] for o in outputs)
    hallucinated = sum(bool(o["tuned"]["hallucinated"]) for o in outputs) / len(outputs)
    assert hallucinated == pytest.approx(generative["tuned"]["chair_s"])


def test_every_epoch_visits_each_pair_once_with_gradient_accumulation() -> None:
    """20 rows, micro-batches of 4 (5 per epoch), 2 per step: 2 steps per epoch, the 5th micro-batch is unused."""
    from dama_engine.training.recipe import _Batches

    schedule = _Batches(20, per_device=4, world_size=1, rank=0, seed=0)
    for epoch in range(3):
        seen = [i for step in (2 * epoch, 2 * epoch + 1) for micro in (0, 1) for i in schedule.indices(step, micro, 2)]
        assert len(seen) == len(set(seen)) == 16  # one epoch's steps draw 16 distinct rows of that epoch's order
        order = torch.randperm(20, generator=torch.Generator().manual_seed(epoch)).tolist()
        assert seen == order[:16]


def test_compiled_decoder_layers_train_like_eager_ones(demo_base: dict[str, Any], tmp_path: Path) -> None:
    """optim.compile=layers through the whole run (reference pass, training, held-out and generative evaluation,
    export) gives the eager run's losses and adapter, float32 on the CPU."""
    common = (
        "optim.max_steps=3",
        "optim.batch_size=8",
        "optim.learning_rate=1e-3",
        "evaluation.enabled=true",
        "evaluation.max_samples=2",
        "evaluation.max_new_tokens=4",
    )
    eager = train(derive(demo_base, tmp_path / "eager", *common, "optim.compile=off"))
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train(derive(demo_base, tmp_path / "compiled", *common, "optim.compile=layers"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # it really compiled

    def losses(run: Path) -> list[float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    assert len(losses(tmp_path / "compiled")) == 3
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-6)
    assert eager.adapter_dir is not None and compiled.adapter_dir is not None
    want = load_file(eager.adapter_dir / "adapter_model.safetensors")
    got = load_file(compiled.adapter_dir / "adapter_model.safetensors")
    assert got.keys() == want.keys()  # compiling in place keeps the parameter names
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
    assert compiled.evaluation is not None and eager.evaluation is not None
    want_metrics, got_metrics = _numbers(eager.evaluation["preference"]), _numbers(compiled.evaluation["preference"])
    assert len(want_metrics) > 20 and got_metrics.keys() == want_metrics.keys()
    assert got_metrics == pytest.approx(want_metrics, rel=1e-3, abs=1e-4)


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested mapping, by dotted path."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _numbers(value, f"{prefix}{key}.").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}
