"""Pair generation: the pairing rule and scores worked by hand, the report, the atomic output, and runs end to end
on a tiny random model (pairs made, samples reproduced across batch sizes, the dataset loads with scores; the
no-pair path names what to change)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from dama_engine.callbacks import Callback
from dama_engine.cli.pairs import pairs_main
from dama_engine.config import ConfigError
from dama_engine.data import judge_response, load_and_validate, load_generative_eval
from dama_engine.data.matcher import Vocabulary
from dama_engine.models import build_tiny_model
from dama_engine.objective import user_hardness
from dama_engine.pairs import NoPairsError, choose_pair, generate_pairs, parse_pairs_config, sample_score
from dama_engine.pairs import output as pair_output
from dama_engine.pairs.report import PromptSamples, pair_report

VOCABULARY = Vocabulary.from_mapping({"cat": ["kitty"], "dog": [], "car": [], "tree": []})


def _judged(*responses: str, truth: tuple[str, ...] = ("cat", "dog")) -> list[Any]:
    return [judge_response(response, truth, VOCABULARY) for response in responses]


# ---------------------------------------------------------------------------------------------------------------
# The rule and the scores, by hand


def test_pairing_rule_and_scores_worked_by_hand() -> None:
    judged = _judged(
        "A cat and a car.",  # 0: covers cat, hallucinates car: (1 - 1) / 2 = 0; 5 words
        "A kitty.",  # 1: faithful, covers cat: 1 / 2; 2 words
        "A cat and a dog sit.",  # 2: faithful, covers both: 2 / 2 = 1; 6 words
        "A dog, a tree and a car near a cat.",  # 3: covers 2, hallucinates 2: 0; 10 words
        "A car.",  # 4: hallucinates car, covers none: -1 / 2; 2 words
        "",  # 5: empty: neither faithful nor hallucinating
    )
    assert [sample_score(j) for j in judged] == [0.0, 0.5, 1.0, 0.0, -0.5, 0.0]
    # Chosen: the faithful sample covering most (2). Rejected: the hallucinating one closest to its 6 words (0: 5).
    assert choose_pair(judged) == (2, 0)
    # Without sample 2, chosen is 1 (2 words): sample 4 (2 words) is closer than 0 (5) and 3 (10).
    assert choose_pair(judged[:2] + judged[3:]) == (1, 3)


def test_ties_go_to_the_earliest_sample_and_then_by_characters() -> None:
    judged = _judged("A dog.", "A cat.", "A tree.", "One car.", "A car.")
    # Chosen: 0 and 1 each cover one object: the earliest. Rejected: 2, 3, 4 all 2 words; "A car." (6 characters)
    # and "A tree." (7) against the chosen's 6 characters: 4 is closest.
    assert choose_pair(judged) == (0, 4)
    assert choose_pair(_judged("A dog.", "A cat.", "A tree.", "A car.")) == (0, 3)  # 6 characters against 7
    same = _judged("A dog.", "A car.", "A car.")
    assert choose_pair(same) == (0, 1)  # identical rejected candidates: the earliest


def test_no_pair_without_both_kinds() -> None:
    assert choose_pair(_judged("A cat.", "A dog.", "Nothing here.")) is None  # all faithful
    assert choose_pair(_judged("A car.", "A tree.")) is None  # all hallucinating
    assert choose_pair(_judged("", "  ", "A car.")) is None  # empty answers are not faithful ones
    assert choose_pair([]) is None


def test_score_of_an_image_without_true_objects() -> None:
    [hallucinating, silent] = _judged("A cat and a car.", "Nothing.", truth=())
    assert sample_score(hallucinating) == -2.0  # (0 - 2) / 1: the divisor is 1 without true objects
    assert sample_score(silent) == 0.0


def test_report_worked_by_hand(tmp_path: Path) -> None:
    sample = load_generative_eval(*_generative_set(tmp_path, prompts=1)).samples[0]
    first = _judged("A cat.", "A car and a tree.", "A car.")
    second = _judged("A cat and a car.", "A tree.")
    prompts = [
        PromptSamples(sample, (1, 2, 3), tuple(first), choose_pair(first)),
        PromptSamples(sample, (4, 5), tuple(second), choose_pair(second)),
    ]
    report = pair_report(prompts)
    assert (report["prompts_tried"], report["pairs"], report["samples"]) == (2, 1, 5)
    assert (report["faithful_samples"], report["hallucinating_samples"], report["empty_samples"]) == (1, 4, 0)
    assert report["prompts_without_faithful_sample"] == 1 and report["prompts_without_hallucinating_sample"] == 0
    assert report["hallucinated_objects_per_sample"] == {"0": 1, "1": 3, "2": 1}
    assert report["most_common_hallucinated_objects"] == [
        {"object": "car", "samples": 3},
        {"object": "tree", "samples": 2},
    ]
    # The pair: "A cat." (1 / 2) against "A car." (2 words, closer than 5): -1 / 2.
    assert prompts[0].pair == (0, 2)
    assert report["mean_chosen_score"] == 0.5 and report["mean_rejected_score"] == -0.5


# ---------------------------------------------------------------------------------------------------------------
# The atomic output


def test_a_failed_write_leaves_no_output_and_the_next_run_clears_its_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = load_generative_eval(*_generative_set(tmp_path / "set", prompts=1)).samples[0]
    judged = _judged("A cat.", "A car.")
    prompts = [PromptSamples(sample, (1, 2), tuple(judged), (0, 1))]
    out = tmp_path / "out"

    def broken(report: dict[str, Any], png: Path) -> Path:
        assert (png.parent / "dataset" / "pairs.jsonl").is_file()  # the dataset is written by now...
        raise OSError("disk full")

    monkeypatch.setattr(pair_output, "plot_report", broken)
    with pytest.raises(OSError, match="disk full"):
        pair_output.write_output(out, prompts, pair_report(prompts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # ...yet nothing is left of it

    # A run killed while writing leaves its staging folder: never at the output path, and the next run removes it.
    (tmp_path / ".out.partial-killed" / "dataset").mkdir(parents=True)
    monkeypatch.undo()
    written = pair_output.write_output(out, prompts, pair_report(prompts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "set"]
    assert written.dataset_path.is_file() and written.chart_path.read_bytes()[:4] == b"\x89PNG"
    # Writing again replaces the output as a whole.
    (out / "stale.txt").write_text("from before")
    pair_output.write_output(out, prompts, pair_report(prompts))
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "set"]


# ---------------------------------------------------------------------------------------------------------------
# End to end on a tiny random model

# Nouns of the tiny tokenizer's base corpus: a random model's samples name some of them, half of which are in each
# image, so some samples are faithful and some hallucinate.
NOUNS = [
    *("cat", "dog", "person", "window", "sign", "table", "cup", "ball", "bowl", "plate", "fish", "door", "bird"),
    *("chair", "bridge", "car", "phone", "tree", "boat", "horse", "bicycle", "house", "bus", "train", "laptop"),
    *("lamp", "clock", "flower", "fence", "desk"),
]


def _generative_set(folder: Path, prompts: int, vocabulary: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    vocabulary = vocabulary or {name: [] for name in NOUNS}
    names = list(vocabulary)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(prompts):
        colour = (40 * index % 256, 255 - 30 * index % 256, 90)
        Image.new("RGB", (32, 32), colour).save(folder / "images" / f"{index % 3}.png")  # 3 images, reused
        objects = names[index % 2 :: 2]
        prompt = "Describe the image." if index % 2 else "What is in this picture?"
        lines.append({"id": f"p{index}", "image": f"images/{index % 3}.png", "prompt": prompt, "objects": objects})
    data = folder / "generative.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "vocabulary.json").write_text(json.dumps(vocabulary))
    return data, folder / "vocabulary.json"


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llava", tmp_path_factory.mktemp("pairs-model") / "llava", seed=0)


def _settings(model: Path, data: tuple[Path, Path], out: Path, **sampling: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model), "precision": "fp32"},
        "data": {"generative": str(data[0]), "vocabulary": str(data[1])},
        "generation": {"temperature": 1.0, "max_new_tokens": 24, "seed": 3},
        "sampling": {"samples_per_prompt": 6, "prompts_per_batch": 3, **sampling},
        "device": "cpu",
        "output_dir": str(out),
    }


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None) -> None:
        self.stages: list[str] = []
        self.progress: list[tuple[str, int, int]] = []
        self.stop_after = stop_after

    def on_stage(self, stage: str, info: dict[str, Any]) -> None:
        self.stages.append(stage)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.progress.append((stage, done, total))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.progress) >= self.stop_after


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_end_to_end_on_a_tiny_model(tiny_llava: Path, tmp_path: Path) -> None:
    data = _generative_set(tmp_path / "set", prompts=6)
    recorder = Recorder()
    result = generate_pairs(parse_pairs_config(_settings(tiny_llava, data, tmp_path / "out")), recorder)
    assert not result.stopped and result.output is not None
    assert recorder.stages == ["validating", "loading_model", "generating", "writing"]
    assert recorder.progress == [("generating", 3, 6), ("generating", 6, 6)]  # a batch is 3 prompts x 6 samples
    report = json.loads(result.output.report_path.read_text())
    assert report["prompts_tried"] == 6 and report["samples"] == 36 and report["pairs"] == result.pairs > 0
    assert sum(report["hallucinated_objects_per_sample"].values()) == 36
    assert report["most_common_hallucinated_objects"] and report["samples_per_second"] > 0

    # Every sample is in samples.jsonl with its judgement; the pairs' chosen answers are faithful (by the test's
    # own matcher run), the rejected ones hallucinate, and the scores are the rule's.
    samples = _records(result.output.samples_path)
    assert len(samples) == 36 and len({(s["prompt_id"], s["sample"]) for s in samples}) == 36
    rows = _records(result.output.dataset_path)
    assert len(rows) == result.pairs
    vocabulary = Vocabulary.load(data[1])
    for row in rows:
        chosen = judge_response(row["chosen"][0]["content"], row["objects"], vocabulary)
        rejected = judge_response(row["rejected"][0]["content"], row["objects"], vocabulary)
        assert not chosen.hallucinated and rejected.hallucinated
        assert (row["chosen_score"], row["rejected_score"]) == (sample_score(chosen), sample_score(rejected))
        roles = {s["role"]: s["response"] for s in samples if s["pair"] == row["id"]}
        assert roles == {"chosen": chosen.response, "rejected": rejected.response}
    # Images are stored once (3 distinct images behind 6 prompts), and the dataset loads as training data with
    # its scores as hardness (chosen_score - rejected_score).
    images = {row["images"][0] for row in rows}
    assert len(list((result.output.dataset_dir / "images").iterdir())) == len(images) <= 3
    loaded, check = load_and_validate(result.output.dataset_dir)
    assert check.ok and len(loaded) == result.pairs
    delta = user_hardness(loaded)
    assert delta is not None
    expected = torch.tensor([row["chosen_score"] - row["rejected_score"] for row in rows])
    assert torch.allclose(delta, expected)

    # Each sample is seeded from (seed, prompt, sample number): another batch size gives the same samples.
    again = generate_pairs(
        parse_pairs_config(_settings(tiny_llava, data, tmp_path / "again", prompts_per_batch=2, samples_per_prompt=6))
    )
    assert again.output is not None
    assert [s["response"] for s in _records(again.output.samples_path)] == [s["response"] for s in samples]
    assert again.output.dataset_path.read_text() == result.output.dataset_path.read_text()


def test_stop_writes_nothing(tiny_llava: Path, tmp_path: Path) -> None:
    data = _generative_set(tmp_path / "set", prompts=6)
    recorder = Recorder(stop_after=1)
    result = generate_pairs(parse_pairs_config(_settings(tiny_llava, data, tmp_path / "out")), recorder)
    assert result.stopped and result.output is None and result.prompts == 3
    assert not (tmp_path / "out").exists() and "writing" not in recorder.stages


def test_no_pairs_says_what_was_tried_and_what_to_change(
    tiny_llava: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Objects the random model never names: every sample is faithful, no prompt yields a pair."""
    data = _generative_set(tmp_path / "set", prompts=2, vocabulary={"red zeppelin": [], "blue walrus": []})
    settings = _settings(tiny_llava, data, tmp_path / "out", samples_per_prompt=2)
    with pytest.raises(NoPairsError, match="2 prompts tried with 2 samples each") as raised:
        generate_pairs(parse_pairs_config(settings))
    assert "samples_per_prompt" in str(raised.value) and "temperature" in str(raised.value)
    assert not (tmp_path / "out").exists()
    # The CLI prints it and exits 2.
    config = tmp_path / "pairs.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert pairs_main([str(config)]) == 2
    assert "no pairs: 2 prompts tried" in capsys.readouterr().err


def test_config_refuses_greedy_decoding_and_bad_input(tmp_path: Path) -> None:
    settings = {"model": {"name_or_path": "m"}, "data": {"generative": "g.jsonl", "vocabulary": "v.json"}}
    assert parse_pairs_config(settings).generation.temperature == 1.0
    with pytest.raises(ConfigError, match=r"generation\.temperature must be > 0"):
        parse_pairs_config({**settings, "generation": {"temperature": 0}})
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        parse_pairs_config({**settings, "sampling": {"samples_per_prompt": 1}})


def test_sampling_from_base_plus_a_starting_adapter(tiny_llava: Path, tmp_path: Path) -> None:
    """``model.init_adapter``: the samples come from base + that PEFT adapter (other answers than the base's)."""
    from dama_engine.config import LoraSection, ModelSection
    from dama_engine.models import load_model, make_trainable

    model = make_trainable(
        load_model(ModelSection(name_or_path=str(tiny_llava)), dtype=torch.float32), LoraSection(r=4)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: perturbed so that the adapter changes the answers
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(str(tmp_path / "adapter"))

    data = _generative_set(tmp_path / "set", prompts=3)
    settings = _settings(tiny_llava, data, tmp_path / "base", prompts_per_batch=3)
    base = generate_pairs(parse_pairs_config(settings))
    settings["model"]["init_adapter"] = str(tmp_path / "adapter")
    tuned = generate_pairs(parse_pairs_config({**settings, "output_dir": str(tmp_path / "tuned")}))
    assert base.output is not None and tuned.output is not None
    assert tuned.report["init_adapter"] == str(tmp_path / "adapter")
    base_answers = [s["response"] for s in _records(base.output.samples_path)]
    tuned_answers = [s["response"] for s in _records(tuned.output.samples_path)]
    assert len(tuned_answers) == 18 and tuned_answers != base_answers
    with pytest.raises(ConfigError, match="init_adapter"):
        settings["model"]["init_adapter"] = str(tmp_path)  # no adapter_config.json there
        generate_pairs(parse_pairs_config(settings))


def test_cli_writes_the_dataset_and_prints_where(
    tiny_llava: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _generative_set(tmp_path / "set", prompts=3)
    config = tmp_path / "pairs.yaml"
    config.write_text(yaml.safe_dump(_settings(tiny_llava, data, tmp_path / "unused")))
    assert pairs_main([str(config), f"output_dir={tmp_path / 'out'}", "sampling.samples_per_prompt=4"]) == 0
    captured = capsys.readouterr()
    assert f"dataset: {tmp_path / 'out' / 'dataset'}" in captured.out and "from 3 prompts (12 samples" in captured.out
    assert "[dama-pairs] generating (prompts=3, samples=12)" in captured.err
    assert (tmp_path / "out" / "report.png").is_file() and not (tmp_path / "unused").exists()
