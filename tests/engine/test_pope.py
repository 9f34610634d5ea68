"""POPE on hand-worked cases: the three samplers, the answer rule and the metrics (torch-free)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dama_engine.data.matcher import Vocabulary
from dama_engine.evaluation.pope import QUESTION_TEMPLATE, PopeQuestion, parse_answer, pope_metrics, pope_questions

# Names in this order; frequency (images holding each): cat 3, dog 2, car 1, tree 1, boat 1, bird 0.
# Co-occurrence: cat-dog 2, cat-car 1, cat-tree 1, dog-tree 1; boat with nothing.
VOCABULARY = Vocabulary.from_mapping({"cat": ["kitty"], "dog": [], "car": [], "tree": [], "boat": [], "bird": []})
OBJECTS = [["cat", "dog"], ["kitty", "car"], ["cat", "dog", "tree"], ["boat"]]


def _by_image(questions: list[PopeQuestion], image: int, present: bool) -> list[str]:
    return [q.entry for q in questions if q.image_index == image and q.present is present]


def test_present_entries_are_the_images_objects_and_the_same_in_every_split() -> None:
    splits = pope_questions(OBJECTS, VOCABULARY, seed=0)
    assert set(splits) == {"random", "popular", "adversarial"}
    for questions in splits.values():
        assert sorted(_by_image(questions, 0, True)) == ["cat", "dog"]  # two objects: both asked
        assert sorted(_by_image(questions, 1, True)) == ["car", "cat"]  # a synonym asks for its name
        assert sorted(_by_image(questions, 2, True)) == ["cat", "dog", "tree"]
        assert _by_image(questions, 3, True) == ["boat"]
    assert splits["random"][:2] == splits["popular"][:2] == splits["adversarial"][:2]


def test_popular_takes_the_most_frequent_absent_entries() -> None:
    popular = pope_questions(OBJECTS, VOCABULARY)["popular"]
    # Image 0 (cat, dog): absent car, tree, boat (1 image each) and bird (0); ties by name.
    assert _by_image(popular, 0, False) == ["boat", "car", "tree"]
    # Image 1 (cat, car): dog (2) first, then boat and tree (1).
    assert _by_image(popular, 1, False) == ["dog", "boat", "tree"]
    # Image 3 (boat): cat (3), dog (2), then car before tree (1, by name).
    assert _by_image(popular, 3, False) == ["cat", "dog", "car"]


def test_adversarial_takes_the_absent_entries_that_co_occur_most() -> None:
    adversarial = pope_questions(OBJECTS, VOCABULARY)["adversarial"]
    # Image 0 (cat, dog): tree co-occurs 1 + 1 = 2, car 1 + 0 = 1, boat and bird 0 (boat more frequent).
    assert _by_image(adversarial, 0, False) == ["tree", "car", "boat"]
    # Image 1 (cat, car): dog 2 + 0, tree 1 + 0, then boat (frequency 1) before bird (0).
    assert _by_image(adversarial, 1, False) == ["dog", "tree", "boat"]
    # Image 3 (boat): nothing co-occurs with boat, so the order is by frequency.
    assert _by_image(adversarial, 3, False) == ["cat", "dog", "car"]


def test_random_is_uniform_over_the_absent_entries_and_seeded() -> None:
    first = pope_questions(OBJECTS, VOCABULARY, seed=7)["random"]
    assert first == pope_questions(OBJECTS, VOCABULARY, seed=7)["random"]
    absent_of_image_0 = {"car", "tree", "boat", "bird"}
    drawn: Counter[str] = Counter()
    for seed in range(2000):
        entries = _by_image(pope_questions(OBJECTS[:1], VOCABULARY, seed=seed)["random"], 0, False)
        assert len(entries) == 3 and len(set(entries)) == 3 and set(entries) <= absent_of_image_0
        drawn.update(entries)
    # Each of 4 absent entries is in a draw of 3 with probability 3/4.
    assert all(0.72 < drawn[name] / 2000 < 0.78 for name in absent_of_image_0), drawn


def test_absent_entries_never_ground_with_attributes() -> None:
    """With an attribute vocabulary, an image with a red circle is never asked about "circle" as absent (the bare
    object is there) nor gets "red circle" as absent; "blue circle" is absent. Multi-word entries are asked."""
    vocabulary = Vocabulary.from_mapping({"objects": {"circle": [], "square": []}, "colours": {"red": [], "blue": []}})
    splits = pope_questions([["red circle"], ["blue square", "red circle"]], vocabulary, per_image=10)
    for questions in splits.values():
        assert _by_image(questions, 0, True) == ["red circle"]
        assert set(_by_image(questions, 0, False)) == {"square", "red square", "blue circle", "blue square"}
        assert set(_by_image(questions, 1, False)) == {"red square", "blue circle"}
    assert PopeQuestion(0, "red circle", True).text == "Is there a red circle in the image?"
    assert QUESTION_TEMPLATE.format(entry="dog") == "Is there a dog in the image?"


def test_fewer_entries_than_asked_for() -> None:
    vocabulary = Vocabulary.from_mapping({"cat": [], "dog": []})
    splits = pope_questions([["cat"], []], vocabulary, per_image=3)
    for questions in splits.values():
        assert _by_image(questions, 0, True) == ["cat"] and _by_image(questions, 0, False) == ["dog"]
        assert _by_image(questions, 1, True) == [] and sorted(_by_image(questions, 1, False)) == ["cat", "dog"]
    with pytest.raises(ValueError, match="per_image"):
        pope_questions([["cat"]], vocabulary, per_image=0)


@pytest.mark.parametrize(
    ("answer", "said", "unclear"),
    [
        ("Yes.", "yes", False),
        ("yes, there is a dog", "yes", False),
        ("No.", "no", False),
        ("There is not a cat in the image.", "no", False),
        ("NOT that I can see", "no", False),
        ("Yes, there is no doubt.", "no", False),  # POPE's rule: "no" anywhere wins
        ("Notably, yes.", "yes", False),  # "notably" is not the word "not"
        ("Nope", "yes", True),  # neither word: counted as yes, reported as unclear
        ("I cannot tell.", "yes", True),
        ("", "yes", True),
        ("a red circle at the top left", "yes", True),
    ],
)
def test_answer_rule(answer: str, said: str, unclear: bool) -> None:
    assert parse_answer(answer) == (said, unclear)


def test_metrics_worked_by_hand() -> None:
    present = [True, True, True, False, False, False, False]
    answers = ["yes", "Yes there is", "no", "yes", "no", "not at all", "hmm"]
    # Parsed: yes yes no | yes no no yes(unclear) -> TP 2, FN 1, FP 2, TN 2.
    metrics = pope_metrics(present, answers)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (2, 1, 2, 2)
    assert metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["precision"] == pytest.approx(2 / 4)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))  # = 4/7
    assert metrics["yes_ratio"] == pytest.approx(4 / 7)
    assert metrics["unclear"] == 1 and metrics["questions"] == 7


def test_metrics_edge_cases() -> None:
    always_no = pope_metrics([True, False], ["no", "no"])
    assert always_no["precision"] == 0.0 and always_no["recall"] == 0.0 and always_no["f1"] == 0.0
    assert always_no["accuracy"] == 0.5 and always_no["yes_ratio"] == 0.0
    empty = pope_metrics([], [])
    assert empty["accuracy"] == 0.0 and empty["questions"] == 0
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        pope_metrics([True, False], ["yes"])


@pytest.mark.parametrize("asked", [True, False])
def test_a_training_runs_evaluation_asks_pope_as_its_config_says(tmp_path: Path, asked: bool) -> None:
    """``evaluation.pope`` of the training config (the job spec's ``evaluation.pope``) reaches the evaluation."""
    from dama_engine.config import parse_config
    from dama_engine.evaluation.config import after_training_config

    config = parse_config(
        {
            "model": {"name_or_path": "some/model"},
            "data": {"train": str(tmp_path / "train.jsonl")},
            "objective": {"method": "dpo"},
            "evaluation": {"generative": "g.jsonl", "vocabulary": "v.json", "pope": asked},
            "run": {"output_dir": str(tmp_path / "run")},
        }
    )
    evaluation = after_training_config(config, tmp_path / "adapter", tmp_path / "run", train_rows=[], held_out=False)
    assert evaluation.pope.enabled is asked
