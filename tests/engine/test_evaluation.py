"""Evaluation: CHAIR and coverage on hand-worked examples, hardness buckets and preference metrics worked out by
hand, the generative eval format, the config, and base-vs-tuned runs end to end on the tiny demo model."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dama_engine.callbacks import Callback
from dama_engine.cli.eval import eval_main as main
from dama_engine.config import ConfigError, LoraSection, ModelSection
from dama_engine.data.generative import GenerativeEvalError, load_generative_eval
from dama_engine.data.matcher import (
    Vocabulary,
    VocabularyError,
    as_vocabulary,
    chair,
    chair_samples,
    mark_response,
    plural_forms,
)
from dama_engine.data.validation import DataError
from dama_engine.evaluation.config import load_evaluation_config, parse_evaluation_config
from dama_engine.evaluation.metrics import bucket_by_hardness, logprob_stats, preference_metrics
from dama_engine.evaluation.report import comparison_table, plot_evaluation
from dama_engine.evaluation.run import EVAL_STAGES, run_evaluation
from dama_engine.models.loading import load_model, make_trainable
from dama_engine.proving.shapes import VOCABULARY, make_demo_dataset
from dama_engine.training.export import add_evaluation_to_adapter
from tests.engine.conftest import png_bytes

ANIMALS = {"cat": ["kitty"], "dog": ["puppy"], "box": [], "glass": [], "person": [], "mouse": []}


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------------------------
# CHAIR


def test_plurals_and_word_boundaries() -> None:
    # Mentioned: cat, box, glass, person, mouse; true: cat, box -> 3 of 5 mentions hallucinated.
    [sample] = chair_samples(
        ["Two Cats, three boxes, some glasses, four people and mice. No concatenation here."],
        [["cat", "box"]],
        ANIMALS,
    )
    assert sample.mentioned == ("cat", "box", "glass", "person", "mouse")
    assert sample.hallucinated == ("glass", "person", "mouse")
    assert sample.covered == ("cat", "box")
    metrics = chair([sample.response], [["cat", "box"]], ANIMALS)
    assert metrics["chair_s"] == 1.0
    assert metrics["chair_i"] == pytest.approx(3 / 5)
    assert metrics["coverage"] == 1.0
    assert metrics["hallucination_rate"] == metrics["chair_s"]
    assert metrics["mean_length"] == 13
    assert chair(["The cat's bowl."], [["cat"]], ANIMALS)["mentions"] == 1
    assert chair(["A concatenated string."], [["cat"]], ANIMALS)["mentions"] == 0


def test_plural_rules() -> None:
    assert plural_forms("cat") == ("cats",)
    assert plural_forms("box") == ("boxes",)
    assert plural_forms("glass") == ("glasses",)
    assert plural_forms("bench") == ("benches",)
    assert plural_forms("pony") == ("ponies",)
    assert plural_forms("toy") == ("toys",)
    assert set(plural_forms("potato")) == {"potatos", "potatoes"}
    assert "people" in plural_forms("person")
    assert plural_forms("knife") == ("knives",)
    assert "firemen" in plural_forms("fireman")
    assert plural_forms("sheep") == ()


def test_a_vocabulary_mapping_is_built_once_per_content() -> None:
    """Judging many answers with one mapping builds its Vocabulary (a regex of every form) once."""
    first = as_vocabulary({"cat": ["kitty"], "dog": []})
    assert as_vocabulary({"dog": [], "cat": ["kitty"]}) is first  # equal content, another dict
    assert as_vocabulary({"cat": ["kitty"]}) is not first
    assert as_vocabulary(first) is first


def test_synonyms_map_to_the_name() -> None:
    [sample] = chair_samples(["A puppy plays with a kitty."], [["dog"]], ANIMALS)
    assert sample.mentioned == ("dog", "cat")
    assert sample.hallucinated == ("cat",)
    # True objects may be given by synonym or plural too.
    assert chair_samples(["A dog."], [["puppies"]], ANIMALS)[0].covered == ("dog",)


def test_repeated_mentions_count_once_per_response() -> None:
    responses = ["A dog. The dog chases another dog and a cat. The cat sleeps.", "A dog and a dog."]
    metrics = chair(responses, [["dog"], ["dog"]], ANIMALS)
    # Response 1: {dog, cat}, cat hallucinated; response 2: {dog}.
    assert metrics["mentions"] == 3
    assert metrics["hallucinated_mentions"] == 1
    assert metrics["chair_i"] == pytest.approx(1 / 3)
    assert metrics["chair_s"] == pytest.approx(1 / 2)


def test_no_mentions_and_no_responses() -> None:
    metrics = chair(["A nice sunny day.", ""], [["dog"], []], ANIMALS)
    assert metrics["chair_i"] == 0.0  # nothing mentioned: defined as 0.0
    assert metrics["chair_s"] == 0.0
    assert metrics["coverage"] == 0.0  # 0 of 1 true object
    assert metrics["mean_length"] == 2.0  # (4 + 0) / 2
    empty = chair([], [], ANIMALS)
    assert empty["responses"] == 0
    assert all(empty[key] == 0.0 for key in ("chair_s", "chair_i", "coverage", "hallucination_rate", "mean_length"))
    with pytest.raises(ValueError, match="2 responses but 1"):
        chair(["a", "b"], [["dog"]], ANIMALS)


def test_multi_word_names_are_matched_before_their_parts() -> None:
    vocabulary = {"traffic light": ["stoplight"], "light": ["lamp"], "dining table": [], "table": []}
    [sample] = chair_samples(
        ["Two traffic lights near a dining-table, and a lamp."], [["traffic light", "table"]], vocabulary
    )
    # "light" inside "traffic light" and "table" inside "dining table" are not counted again.
    assert sample.mentioned == ("traffic light", "dining table", "light")
    assert sample.hallucinated == ("dining table", "light")  # flat names are independent objects
    assert sample.covered == ("traffic light",)
    assert sample.missed == ("table",)
    metrics = chair([sample.response], [["traffic light", "table"]], vocabulary)
    assert metrics["chair_i"] == pytest.approx(2 / 3)
    assert metrics["coverage"] == pytest.approx(1 / 2)


def test_attribute_vocabulary_of_the_demo() -> None:
    truth = ["red circle", "blue square"]
    responses = [
        "A red circle and a blue box.",  # both true
        "A crimson disc and a green square.",  # green square hallucinated
        "A circle, a star and the red circle.",  # the bare circle repeats the red circle; star hallucinated
        "Two squares.",  # a bare square: grounded (blue square), but does not cover it
    ]
    samples = chair_samples(responses, [truth] * 4, VOCABULARY)
    assert [s.mentioned for s in samples] == [
        ("red circle", "blue square"),
        ("red circle", "green square"),
        ("star", "red circle"),
        ("square",),
    ]
    assert [s.hallucinated for s in samples] == [(), ("green square",), ("star",), ()]
    assert [len(s.covered) for s in samples] == [2, 1, 1, 0]
    metrics = chair(responses, [truth] * 4, VOCABULARY)
    assert metrics["chair_s"] == pytest.approx(2 / 4)
    assert metrics["chair_i"] == pytest.approx(2 / 7)
    assert metrics["coverage"] == pytest.approx(4 / 8)
    # An annotation without the colour: any colour of that shape is grounded and covers it.
    [bare] = chair_samples(["A purple circle."], [["circle"]], VOCABULARY)
    assert bare.hallucinated == ()
    assert bare.covered == ("circle",)


def test_mark_response_gives_each_mention_its_span_and_verdict() -> None:
    answer = "A crimson disc, a circle and a green square."
    marked = mark_response(answer, ["red circle", "blue square"], VOCABULARY)
    spans = [(m["start"], m["end"], m["text"], m["object"], m["hallucinated"]) for m in marked["mentions"]]
    assert spans == [
        (2, 14, "crimson disc", "red circle", False),  # a synonym of the true red circle
        (18, 24, "circle", "circle", False),  # a bare repeat: grounded, marked where it is written
        (31, 43, "green square", "green square", True),
    ]
    assert all(answer[start:end] == text for start, end, text, _, _ in spans)
    assert marked["hallucinated"] == ["green square"]
    assert marked["covered"] == ["red circle"]
    assert marked["missed"] == ["blue square"]


def test_vocabulary_problems_are_reported() -> None:
    with pytest.raises(VocabularyError, match="synonym of both"):
        Vocabulary.from_mapping({"cup": ["mug"], "glass": ["mug"]})
    with pytest.raises(VocabularyError, match="list of synonyms"):
        Vocabulary.from_mapping({"cup": "mug"})
    with pytest.raises(VocabularyError, match="not in the vocabulary"):
        chair(["A cat."], [["zebra"]], ANIMALS)
    with pytest.raises(VocabularyError, match="colours"):
        Vocabulary.from_mapping({"objects": {"circle": []}, "colours": ["red"]})
    # A listed synonym wins over a generated plural.
    vocabulary = Vocabulary.from_mapping({"glass": [], "glasses": ["spectacles"]})
    assert vocabulary.mentioned("He wears glasses and holds a glass.") == ["glasses", "glass"]


# ---------------------------------------------------------------------------------------------------------------
# The generative eval format


def test_load_the_demo_generative_set(tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=0, n_eval=0, n_generative=5)
    eval_set = load_generative_eval(demo.generative_eval, demo.vocabulary)
    assert len(eval_set.samples) == 5
    first = eval_set.samples[0]
    assert first.sample_id == "gen-00000"
    assert all(name in eval_set.vocabulary.names for name in first.objects)
    assert first.image.load().size == (64, 64)


def test_torch_free_half_is_public_in_the_data_package() -> None:
    """The vocabulary, CHAIR and the generative loader live in the torch-free dama_engine.data (the upload check uses
    them); the package names them, and the generative set's errors are data errors."""
    import dama_engine.data
    from dama_engine.data import generative, matcher

    names = {
        matcher: ["Vocabulary", "VocabularyError", "VocabularyLike", "normalize_name", "plural_forms",
                       "as_vocabulary", "ChairSample", "judge_response", "chair_samples", "summarize_chair", "chair"],
        generative: ["GenerativeSample", "GenerativeEvalSet", "load_generative_eval", "GenerativeEvalError"],
    }  # fmt: skip
    for module, module_names in names.items():
        for name in module_names:
            assert getattr(dama_engine.data, name) is getattr(module, name), name
    assert issubclass(GenerativeEvalError, DataError)
    assert chair(["a cat"], [["cat"]], ANIMALS)["chair_s"] == 0.0


def test_generative_set_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "vocabulary.json").write_text(json.dumps({"cat": ["kitty"], "dog": []}))
    (tmp_path / "cat.png").write_bytes(png_bytes((10, 10, 10)))
    uri = "data:image/png;base64," + base64.b64encode(png_bytes((20, 20, 20))).decode()
    lines = [
        {"image": "cat.png", "prompt": "Describe.", "objects": ["kitty"]},  # fine, id "1"
        {"id": "b", "image": uri, "prompt": "Describe.", "objects": []},  # fine
        {"id": "c", "image": "missing.png", "prompt": "Describe.", "objects": ["cat"]},
        {"id": "d", "image": "cat.png", "objects": ["cat"]},
        {"id": "e", "image": "cat.png", "prompt": "Describe.", "objects": ["zebra"]},
        {"id": "b", "image": "cat.png", "prompt": "Describe.", "objects": ["dog"]},
        {"id": "f", "image": "../cat.png", "prompt": "Describe.", "objects": ["dog"]},
    ]
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(GenerativeEvalError) as raised:
        load_generative_eval(data, tmp_path / "vocabulary.json")
    assert [(e["row"], e["field"]) for e in raised.value.errors] == [
        (3, "image"),
        (4, "prompt"),
        (5, "objects[0]"),
        (6, "id"),
        (7, "image"),
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    loaded = load_generative_eval(data, tmp_path / "vocabulary.json")
    assert [(s.sample_id, s.objects) for s in loaded.samples] == [("1", ("cat",)), ("b", ())]
    with pytest.raises(GenerativeEvalError, match="not found"):
        load_generative_eval(data, tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------------------------
# Hardness buckets and preference metrics


def test_buckets_from_tertiles_and_given_thresholds() -> None:
    buckets = bucket_by_hardness([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    # Linear-interpolation tertiles of 1..6: 1 + 5/3 and 1 + 10/3.
    assert (buckets.low, buckets.high) == (pytest.approx(8 / 3), pytest.approx(13 / 3))
    assert buckets.labels == ("hard", "hard", "medium", "medium", "easy", "easy")
    assert buckets.source == "tertiles"
    given = bucket_by_hardness([0.05, 0.1, 0.2, 0.3, 0.6], thresholds=(0.1, 0.3))
    assert given.labels == ("hard", "medium", "medium", "medium", "easy")  # thresholds themselves are medium
    assert given.describe()["counts"] == {"easy": 1, "medium": 3, "hard": 1}
    with pytest.raises(ValueError, match="low <= high"):
        bucket_by_hardness([0.1], thresholds=(0.5, 0.1))
    with pytest.raises(ValueError, match="no pairs"):
        bucket_by_hardness([])
    with pytest.raises(ValueError, match="NaN"):
        bucket_by_hardness([0.1, float("nan")])


def test_preference_metrics_by_bucket() -> None:
    beta = 0.1
    policy_chosen = [-10.0, -10.0, -22.0, -5.0]
    policy_rejected = [-20.0, -10.0, -10.0, -5.0]
    ref_chosen = [-12.0, -10.0, -20.0, -6.0]
    ref_rejected = [-18.0, -10.0, -10.0, -4.0]
    # R = (pc - rc) - (pr - rr) = [4, 0, -2, 2]; beta R = [0.4, 0, -0.2, 0.2].
    hardness = [0.6, 0.05, 0.05, 0.3]  # easy, hard, hard, medium with thresholds (0.1, 0.5)
    result = preference_metrics(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, hardness, thresholds=(0.1, 0.5)
    )
    overall = result["overall"]
    assert overall["count"] == 4
    assert overall["accuracy"] == pytest.approx(0.5)
    assert overall["margin"] == pytest.approx(0.1)
    expected_loss = (softplus(-0.4) + math.log(2) + softplus(0.2) + softplus(-0.2)) / 4
    assert overall["loss"] == pytest.approx(expected_loss)
    assert overall["rewards_chosen"] == pytest.approx(0.1 * (2 + 0 - 2 + 1) / 4)
    assert overall["rewards_rejected"] == pytest.approx(0.1 * (-2 + 0 + 0 - 1) / 4)
    buckets = result["buckets"]
    assert buckets["easy"]["count"] == 1 and buckets["easy"]["margin"] == pytest.approx(0.4)
    assert buckets["medium"]["accuracy"] == 1.0 and buckets["medium"]["margin"] == pytest.approx(0.2)
    assert buckets["hard"]["count"] == 2
    assert buckets["hard"]["accuracy"] == 0.0
    assert buckets["hard"]["margin"] == pytest.approx(-0.1)
    assert buckets["hard"]["loss"] == pytest.approx((math.log(2) + softplus(0.2)) / 2)
    assert result["thresholds"]["low"] == 0.1 and result["thresholds"]["thresholds_source"] == "given"

    # No hardness: no buckets; an empty bucket has a count of 0 and no values.
    plain = preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    assert plain["buckets"] is None and plain["thresholds"] is None
    all_medium = preference_metrics(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, hardness, thresholds=(0.0, 1.0)
    )
    assert all_medium["buckets"]["easy"] == {
        "count": 0,
        "loss": None,
        "accuracy": None,
        "margin": None,
        "rewards_chosen": None,
        "rewards_rejected": None,
    }
    with pytest.raises(ValueError, match="same length"):
        preference_metrics([1.0], [1.0, 2.0], [1.0], [1.0], beta)


def test_logprob_stats() -> None:
    stats = logprob_stats([-1.0, -5.0, -3.0], [-2.0, -4.0, -3.0], [0.9, 0.5, 0.1])
    overall = stats["overall"]
    assert overall["logp_accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert overall["logp_margin"] == pytest.approx(0.0)
    assert overall["logp_chosen"] == pytest.approx(-3.0)
    assert stats["buckets"]["easy"]["logp_accuracy"] == 1.0
    assert stats["buckets"]["hard"]["logp_accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Configuration


def test_config_is_checked() -> None:
    model = {"name_or_path": "some/model"}
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        parse_evaluation_config({"model": model})
    with pytest.raises(ConfigError, match=r"needs data\.vocabulary"):
        parse_evaluation_config({"model": model, "data": {"generative": "g.jsonl"}})
    with pytest.raises(ConfigError, match=r"generation\.temprature"):
        parse_evaluation_config({"model": model, "data": {"preference": "p.jsonl"}, "generation": {"temprature": 1}})
    with pytest.raises(ConfigError, match="low <= high"):
        parse_evaluation_config({"model": model, "data": {"preference": "p"}, "hardness": {"thresholds": [0.5, 0.1]}})
    with pytest.raises(ConfigError, match="not a device"):
        run_evaluation(parse_evaluation_config({"model": model, "data": {"preference": "p"}, "device": "toaster"}))


def test_config_from_yaml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"preference": "p.jsonl"}}))
    config = load_evaluation_config(path, ["generation.max_new_tokens=5", "beta=0.2", "hardness.thresholds=[0.1, 0.3]"])
    assert config.generation.max_new_tokens == 5
    assert config.beta == 0.2
    assert config.hardness.thresholds == (0.1, 0.3)


def test_table_and_chart_of_partial_results(tmp_path: Path) -> None:
    """Generative results of the base only, and preference pairs without hardness: no buckets, no tuned column."""
    results = {
        "model": "m",
        "adapter": None,
        "generative": {"base": chair(["A cat."], [["dog"]], ANIMALS), "tuned": None},
        "preference": {
            "base": logprob_stats([-1.0, -2.0], [-3.0, -1.0]),
            "tuned": None,
            "implicit_reward": None,
        },
    }
    table = comparison_table(results)
    assert ("chair_s", 1.0, None) in table
    # hallucination_rate equals chair_s under the matcher's rules: the table shows that number once.
    assert results["generative"]["base"]["hallucination_rate"] == 1.0
    assert [name for name, _, _ in table if name.startswith(("chair", "hallucination"))] == ["chair_s", "chair_i"]
    assert ("logp_accuracy", 0.5, None) in table
    assert not any("[" in name for name, _, _ in table)
    chart = plot_evaluation(results, tmp_path / "chart.png")
    assert chart.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------------------------
# End to end on the tiny LLaVA with the demo's data: base vs a LoRA adapter, the base alone, the CLI


class Recorder(Callback):
    def __init__(self) -> None:
        self.stages: list[tuple[str, Any]] = []
        self.progress: list[tuple[str, int, int]] = []

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.stages.append((stage, info.get("model")))

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.progress.append((stage, done, total))


def _perturbed_adapter(model_section: ModelSection, folder: Path, seed: int) -> Path:
    """A LoRA adapter (with the projector saved in full, as dama-train's demo exports it) whose weights are perturbed
    so that the model differs from the base."""
    model = make_trainable(load_model(model_section, dtype=torch.float32), LoraSection(r=4, train_projector=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo's eval pairs and generative set, the tiny LLaVA, and a perturbed LoRA adapter on it."""
    root = tmp_path_factory.mktemp("eval-demo")
    data = make_demo_dataset(root / "data", n_train=0, n_eval=8, n_generative=4, with_hardness=True)
    model_section = ModelSection(name_or_path=str(tiny_models["llava"]), precision="fp32")
    settings = {
        "model": model_section.model_dump(),
        "adapter": str(_perturbed_adapter(model_section, root / "adapter", seed=0)),
        "data": {
            "preference": str(data.eval),
            "generative": str(data.generative_eval),
            "vocabulary": str(data.vocabulary),
            "max_samples": 3,
        },
        "generation": {"max_new_tokens": 6},
        "batch_size": 4,
        "output_dir": str(root / "eval"),
    }
    recorder = Recorder()
    result = run_evaluation(parse_evaluation_config(settings), recorder)
    return {"root": root, "settings": settings, "result": result, "recorder": recorder}


def test_run_evaluation_writes_everything(demo: dict[str, Any]) -> None:
    result = demo["result"]
    results = json.loads(result.results_path.read_text())
    assert results["adapter"] == demo["settings"]["adapter"]

    generative = results["generative"]
    assert generative["samples"] == 3
    for model in ("base", "tuned"):
        assert {"chair_s", "chair_i", "coverage", "hallucination_rate", "mean_length"} <= set(generative[model])
    pope = generative["pope"]  # every split, both models, on the same questions
    assert set(pope["questions"]) == {"random", "popular", "adversarial"}
    for model in ("base", "tuned"):
        for split, count in pope["questions"].items():
            metrics = pope[model][split]
            assert metrics["questions"] == count == metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"]
            assert {"accuracy", "precision", "recall", "f1", "yes_ratio", "unclear"} <= set(metrics)

    preference = results["preference"]
    assert preference["pairs"] == 8 and preference["skipped"] == 0
    assert preference["hardness"]["source"] == "user"  # the demo rows carry a hardness column
    assert preference["hardness"]["thresholds_source"] == "tertiles"
    assert sum(preference["hardness"]["counts"].values()) == 8
    assert preference["tuned"]["overall"]["count"] == 8
    implicit = preference["implicit_reward"]
    assert {"loss", "accuracy", "margin"} <= set(implicit["overall"])
    assert set(implicit["buckets"]) == {"easy", "medium", "hard"}
    # The adapter moved the model: the tuned log-probs differ from the base ones.
    assert preference["tuned"]["overall"]["logp_chosen"] != preference["base"]["overall"]["logp_chosen"]

    samples = [json.loads(line) for line in result.generations_path.read_text().splitlines()]
    assert len(samples) == 3
    assert {"id", "prompt", "objects", "base", "tuned"} <= set(samples[0])
    assert {"response", "mentioned", "hallucinated", "pope"} <= set(samples[0]["tuned"])
    assert {"entry", "present", "answer"} == set(samples[0]["tuned"]["pope"][0])
    pairs = [json.loads(line) for line in result.pairs_path.read_text().splitlines()]
    assert len(pairs) == 8 and {"bucket", "reward_margin"} <= set(pairs[0])
    assert result.chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    recorder = demo["recorder"]
    stages = [stage for stage, _ in recorder.stages]
    assert set(stages) <= set(EVAL_STAGES)
    assert stages[0] == "validating" and stages[-1] == "writing"
    assert ("log_probs", "base") in recorder.stages and ("generating", "tuned") in recorder.stages
    # One generating pass per model: the 3 descriptions, then POPE's distinct questions.
    asked = sum(len(sample["base"]["pope"]) for sample in samples)
    assert ("generating", 3, 3 + asked) in recorder.progress
    assert ("generating", 3 + asked, 3 + asked) in recorder.progress

    table = {name: (base, tuned) for name, base, tuned in comparison_table(results)}
    assert table["chair_s"] == (generative["base"]["chair_s"], generative["tuned"]["chair_s"])
    assert table["reward_accuracy [hard]"][0] is None
    assert table["pope_f1 [adversarial]"] == (pope["base"]["adversarial"]["f1"], pope["tuned"]["adversarial"]["f1"])


def test_cli_without_adapter_matches_the_base_side(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The base model alone gives the same numbers as the adapter switched off."""
    settings = {**demo["settings"], "adapter": None}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(settings))
    assert main([str(path), f"output_dir={tmp_path / 'out'}"]) == 0
    printed = capsys.readouterr().out
    assert "chair_s" in printed and "logp_accuracy [easy]" in printed
    base_only = json.loads((tmp_path / "out" / "results.json").read_text())
    with_adapter = demo["result"].results
    assert base_only["preference"]["tuned"] is None and base_only["preference"]["implicit_reward"] is None
    assert base_only["preference"]["base"] == with_adapter["preference"]["base"]
    assert base_only["generative"]["base"] == with_adapter["generative"]["base"]
    assert (tmp_path / "out" / "evaluation.png").is_file()


def test_tuned_from_a_starting_adapter_is_compared_with_it_and_with_the_plain_base(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    """``model.init_adapter``: ``base`` is base + the starting adapter (its numbers are those of that adapter
    evaluated alone), ``plain_base`` the model without adapters, ``tuned`` unchanged (shared/DAMA.md 4b)."""
    model_section = ModelSection.model_validate(demo["settings"]["model"])
    _perturbed_adapter(model_section, tmp_path / "start", seed=1)
    settings = {**demo["settings"], "output_dir": str(tmp_path / "chained")}
    settings["model"] = {**settings["model"], "init_adapter": str(tmp_path / "start")}
    recorder = Recorder()
    chained = run_evaluation(parse_evaluation_config(settings), recorder).results
    alone = {**demo["settings"], "adapter": str(tmp_path / "start"), "output_dir": str(tmp_path / "alone")}
    alone["data"] = {"preference": demo["settings"]["data"]["preference"]}
    start_alone = run_evaluation(parse_evaluation_config(alone)).results
    plain = demo["result"].results  # the same tuned adapter, evaluated against the plain base

    # The starting adapter by its folder's name (the results travel with the adapter; a path means nothing there).
    assert chained["init_adapter"] == "start" and plain["init_adapter"] is None
    preference, generative = chained["preference"], chained["generative"]
    assert preference["base"] == start_alone["preference"]["tuned"] != plain["preference"]["base"]
    assert preference["plain_base"] == plain["preference"]["base"]
    assert preference["tuned"] == plain["preference"]["tuned"]
    assert generative["plain_base"] == plain["generative"]["base"]
    assert generative["tuned"] == plain["generative"]["tuned"]
    assert "plain_base" not in plain["preference"] and "plain_base" not in plain["generative"]
    # The implicit rewards use base + the starting adapter as the reference.
    assert preference["implicit_reward"] != plain["preference"]["implicit_reward"]
    assert [stage for stage in recorder.stages if stage[0] == "log_probs"] == [
        ("log_probs", "plain_base"),
        ("log_probs", "base"),
        ("log_probs", "tuned"),
    ]

    plain_rows = comparison_table(chained, base="plain_base")
    assert [row[1] for row in plain_rows] == [row[1] for row in comparison_table(plain)]
    assert [row[2] for row in plain_rows] == [row[2] for row in comparison_table(chained)]
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text("# card\n")
    add_evaluation_to_adapter(tmp_path / "card", chained)
    card = (tmp_path / "card" / "README.md").read_text()
    assert "| metric | plain base | base + starting adapter | tuned |" in card
    assert f"| chair_s | {plain['generative']['base']['chair_s']:.4f} |" in card

    settings["model"]["init_adapter"] = str(tmp_path / "none")
    with pytest.raises(ConfigError, match=r"model\.init_adapter: .*none holds no adapter_config\.json"):
        run_evaluation(parse_evaluation_config(settings))


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"preference": "p.jsonl"}, "bogus": 1}))
    assert main([str(path)]) == 2
    assert "bogus" in capsys.readouterr().err
    (tmp_path / "vocabulary.json").write_text("{}")
    (tmp_path / "gen.jsonl").write_text("")
    settings = {"model": {"name_or_path": "m"}, "data": {"generative": str(tmp_path / "gen.jsonl")}}
    settings["data"]["vocabulary"] = str(tmp_path / "vocabulary.json")
    path.write_text(yaml.safe_dump(settings))
    assert main([str(path)]) == 2
    assert "vocabulary" in capsys.readouterr().err


def _row(number: int, hardness: float | None = None) -> Any:
    from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, TextPart

    return PreferenceRow(
        row_id=f"r{number}",
        prompt=(Message(role="user", content=(ImagePart(), TextPart("Describe."))),),
        chosen="A red square.",
        rejected="A blue circle.",
        images=(ImageSource(data=png_bytes((200, 30, 30))),),
        hardness=hardness,
        row_number=number,
    )


def test_after_training_evaluation_covers_eval_fraction_and_clip_scored_runs(tmp_path: Path) -> None:
    from dama_engine.config import parse_config
    from dama_engine.evaluation.config import after_training_config

    def config(method: str, **data: Any) -> Any:
        return parse_config(
            {
                "model": {"name_or_path": "m"},
                "data": {"train": "pairs.jsonl", **data},
                "objective": {"method": method},
                "hardness": {"scorer": "my/clip", "aggregation": "mean_cosine", "rescale": "minmax"},
            }
        )

    unscored, scored = [_row(1), _row(2)], [_row(1, 0.5), _row(2, -0.5)]
    # eval_fraction: the held-out pairs come from the run (no file); CLIP scored the training data, so the same
    # scorer and aggregation bucket them.
    held_out = after_training_config(
        config("dama", eval_fraction=0.2), tmp_path / "a", tmp_path, train_rows=unscored, held_out=True
    )
    assert held_out.data.preference == "pairs.jsonl (held out: data.eval_fraction 0.2)"
    assert (held_out.hardness.scorer, held_out.hardness.aggregation, held_out.hardness.rescale) == (
        "my/clip",
        "mean_cosine",
        "minmax",
    )
    # User scores: no scorer to load (the pairs carry their own, rescaled as in training); nor for plain DPO.
    for method, rows in (("dama", scored), ("dpo", unscored)):
        evaluation = after_training_config(
            config(method, eval="heldout.jsonl"), tmp_path / "a", tmp_path, train_rows=rows, held_out=True
        )
        assert evaluation.data.preference == "heldout.jsonl" and evaluation.hardness.scorer is None
