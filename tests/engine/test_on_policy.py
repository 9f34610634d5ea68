"""On-policy pairs (dama_engine.proving.on_policy): reading sampled descriptions and the oracle's hardness of a pair."""

from __future__ import annotations

import math

import pytest

from dama_engine.proving.on_policy import said_objects, text_hardness
from dama_engine.proving.shapes import SceneObject, describe_scene, oracle_hardness

SCENE = [SceneObject("orange", "circle", "top left"), SceneObject("blue", "star", "bottom right")]


def test_said_objects_reads_the_canonical_phrases() -> None:
    assert said_objects(describe_scene(SCENE)) == SCENE
    assert said_objects("A Red circle at the top left and something else.") == [
        SceneObject("red", "circle", "top left")
    ]


def test_text_hardness_is_the_oracles_for_canonical_answers_and_scores_empty_cells_zero() -> None:
    said = [SceneObject("red", "circle", "top left"), SceneObject("blue", "star", "bottom right")]
    assert text_hardness(SCENE, describe_scene(SCENE), describe_scene(said)) == oracle_hardness(SCENE, said)
    # An object invented in an empty cell scores logit 0: chosen [5, 5] against rejected [5, 0, 5] gives
    # delta = -1 / (4 e^5 + 1) (joint_softmax shares one softmax over both answers, so the longer one gains mass).
    invented = describe_scene([*SCENE[:1], SceneObject("green", "square", "top right"), *SCENE[1:]])
    expected = -1 / (4 * math.exp(5) + 1)
    assert text_hardness(SCENE, describe_scene(SCENE), invented) == pytest.approx(expected, rel=1e-4)  # float32
    # A sampled non-word gets no colour credit, and does not fail.
    assert -1 <= text_hardness(SCENE, describe_scene(SCENE), "A purplem circle at the top left.") <= 1
