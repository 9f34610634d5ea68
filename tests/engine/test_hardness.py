"""Data hardness (shared/DAMA.md section 1): splitter rules, aggregations against hand-worked numbers, a tiny
random-weight CLIP built offline in the test, user-supplied scores, results on disk and the cache key."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dama_engine.callbacks import Callback
from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, TextPart
from dama_engine.evaluation.config import parse_evaluation_config
from dama_engine.evaluation.metrics import preference_metrics
from dama_engine.evaluation.run import _preference_hardness
from dama_engine.models.tiny import build_tiny_clip
from dama_engine.objective.hardness import (
    aggregate,
    flat_index,
    get_splitter,
    joint_softmax,
    mean_cosine,
    rescale_minmax,
    split_sub_sentences,
    user_hardness,
)
from dama_engine.objective.scoring import (
    ClipHardnessScorer,
    HardnessConfig,
    HardnessResult,
    compute_hardness,
    describe_hardness,
    hardness_cache_key,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 36)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_row(
    number: int,
    chosen: str = "A red square.",
    rejected: str = "A blue circle.",
    *,
    color: tuple[int, int, int] = (200, 30, 30),
    with_image: bool = True,
    chosen_score: float | None = None,
    rejected_score: float | None = None,
    hardness: float | None = None,
) -> PreferenceRow:
    content = (ImagePart(), TextPart("Describe the image.")) if with_image else (TextPart("Describe."),)
    return PreferenceRow(
        row_id=f"r{number}",
        prompt=(Message(role="user", content=content),),
        chosen=chosen,
        rejected=rejected,
        images=(ImageSource(data=png_bytes(color)),) if with_image else (),
        chosen_score=chosen_score,
        rejected_score=rejected_score,
        hardness=hardness,
        row_number=number,
    )


# ---------------------------------------------------------------------------------------------------------------
# Section 1.1: the rule splitter
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # sentence boundaries, trailing punctuation stripped
        ("A cat sits on a mat. It is black! Is it asleep?", ["A cat sits on a mat", "It is black", "Is it asleep"]),
        # decimals never split
        (
            "The bottle holds 3.5 liters. The cap is 0.5 cm wide.",
            ["The bottle holds 3.5 liters", "The cap is 0.5 cm wide"],
        ),
        # abbreviations: titles, dotted forms; a semicolon always splits
        (
            "Mr. Smith holds fruit, e.g. an apple; Dr. Jones waves at the U.S. flag.",
            ["Mr. Smith holds fruit, e.g. an apple", "Dr. Jones waves at the U.S. flag"],
        ),
        # "etc." ends a sentence only before a capital
        (
            "Apples, pears etc. The table is red. Pens etc. are on it.",
            ["Apples, pears etc", "The table is red", "Pens etc. are on it"],
        ),
        # ", and" / ", but" / ", so" with at least 2 words each side
        (
            "The cat sleeps, and it purrs, but the dog barks, so the cat wakes.",
            ["The cat sleeps", "it purrs", "the dog barks", "the cat wakes"],
        ),
        # bare "and" / "but" only with at least 3 words each side: noun phrases stay whole
        ("The sky is blue and the grass is green.", ["The sky is blue", "the grass is green"]),
        ("A black and white photo of a cat and a dog.", ["A black and white photo of a cat and a dog"]),
        ("The dog is small but fierce.", ["The dog is small but fierce"]),
        # greedy left to right: the first "and" has only 2 words ("a coat") before the next candidate
        (
            "The man has a hat and a coat and the woman sits on a bench.",
            ["The man has a hat and a coat", "the woman sits on a bench"],
        ),
        # Oxford-comma lists: a one-word side stays, a two-word side splits
        ("Red, white, and blue.", ["Red, white, and blue"]),
        ("Red, white, and blue flags.", ["Red, white", "blue flags"]),
        # ", or" splits, bare " or " never does
        ("It may be a cat or a small dog, or it is a toy.", ["It may be a cat or a small dog", "it is a toy"]),
        # lines are boundaries; list numbers and bullets go
        ("1. A red car\n2. A blue bus\n- A green truck", ["A red car", "A blue bus", "A green truck"]),
        # whitespace is trimmed and collapsed, letterless pieces dropped
        ("   The  lamp \t is on .  ;  ... ", ["The lamp is on"]),
        ("", []),
        ("   \n\t  ", []),
        ("42.", []),
    ],
)
def test_rule_splitter(text: str, expected: list[str]) -> None:
    assert split_sub_sentences(text) == expected


def test_splitter_registry() -> None:
    assert get_splitter() is split_sub_sentences
    assert get_splitter("rule") is split_sub_sentences
    with pytest.raises(ValueError, match="unknown splitter 'llm'"):
        get_splitter("llm")


# ---------------------------------------------------------------------------------------------------------------
# Section 1.2: aggregations on fixed numbers
# ---------------------------------------------------------------------------------------------------------------


def test_flat_index_layout() -> None:
    pair_index, is_chosen = flat_index([2, 0, 1], [1, 2, 0])
    # pair 0: C C R, pair 1: R R, pair 2: C
    assert pair_index.tolist() == [0, 0, 0, 1, 1, 2]
    assert is_chosen.tolist() == [True, True, False, False, False, True]


def test_joint_softmax_hand_worked() -> None:
    # Five pairs with different sub-sentence counts (chosen, rejected): (2, 1), (1, 1), (3, 1), (1, 0), (0, 0).
    pair_index, is_chosen = flat_index([2, 1, 3, 1, 0], [1, 1, 1, 0, 0])
    logits = torch.tensor(
        [
            LN3, LN2, 0.0,  # pair 0: exp -> 3, 2 | 1; total 6; s_w = 5/6, s_l = 1/6; delta = 4/6 = 2/3
            0.0, LN3,  # pair 1: exp -> 1 | 3; total 4; s_w = 1/4, s_l = 3/4; delta = -1/2
            5.0, 5.0, 5.0, 5.0 + LN2,  # pair 2: e^5 * (1, 1, 1 | 2); total 5 e^5; delta = 3/5 - 2/5 = 1/5
            100.0,  # pair 3: chosen only, its one sub-sentence takes all the mass; delta = 1 - 0 = 1
        ]
    )  # fmt: skip
    delta = joint_softmax(logits, pair_index, is_chosen, num_pairs=5)
    # pair 4 has no sub-sentences at all: delta = 0
    torch.testing.assert_close(delta, torch.tensor([2 / 3, -1 / 2, 1 / 5, 1.0, 0.0]))


def test_joint_softmax_large_logits_do_not_overflow() -> None:
    # CLIP scales cosines by 100; exp(1000) overflows float32 unless the max is subtracted first.
    pair_index, is_chosen = flat_index([1], [1])
    delta = joint_softmax(torch.tensor([1000.0 + LN3, 1000.0]), pair_index, is_chosen, num_pairs=1)
    # exp -> 3 | 1 (times e^1000); delta = 3/4 - 1/4 = 1/2
    torch.testing.assert_close(delta, torch.tensor([0.5]))


def test_mean_cosine_hand_worked() -> None:
    # Three pairs (chosen, rejected): (2, 1), (1, 3), (0, 1); binary fractions, so the sums are exact.
    pair_index, is_chosen = flat_index([2, 1, 0], [1, 3, 1])
    cosine = torch.tensor(
        [
            0.5, 0.25, 0.125,  # pair 0: mean(0.5, 0.25) = 0.375, minus 0.125 -> 0.25
            -0.5, 0.25, 0.75, -0.25,  # pair 1: -0.5 minus mean(0.25, 0.75, -0.25) = 0.25 -> -0.75
            0.5,  # pair 2: no chosen sub-sentences (mean 0), minus 0.5 -> -0.5
        ]
    )  # fmt: skip
    delta = mean_cosine(cosine, pair_index, is_chosen, num_pairs=3)
    assert delta.tolist() == [0.25, -0.75, -0.5]


def test_aggregate_scales_cosines_for_joint_softmax() -> None:
    pair_index, is_chosen = flat_index([1], [1])
    # logit scale 2: logits = [ln 3, 0] -> exp 3 | 1 -> delta = 1/2; mean_cosine: ln3/2 - 0
    cosine = torch.tensor([LN3 / 2, 0.0])
    joint = aggregate(
        "joint_softmax", cosine=cosine, logit_scale=2.0, pair_index=pair_index, is_chosen=is_chosen, num_pairs=1
    )
    torch.testing.assert_close(joint, torch.tensor([0.5]))
    mean = aggregate(
        "mean_cosine", cosine=cosine, logit_scale=2.0, pair_index=pair_index, is_chosen=is_chosen, num_pairs=1
    )
    torch.testing.assert_close(mean, torch.tensor([LN3 / 2]))
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate("sum", cosine=cosine, logit_scale=1.0, pair_index=pair_index, is_chosen=is_chosen, num_pairs=1)


# ---------------------------------------------------------------------------------------------------------------
# Section 1.2: the scorer on a tiny random-weight CLIP built here, offline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP with random weights (hidden 32, 2 layers, 30 px images) and a byte-level tokenizer, saved to disk."""
    model, processor = build_tiny_clip()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(tiny_clip: Path) -> ClipHardnessScorer:
    return ClipHardnessScorer.from_pretrained(tiny_clip, device="cpu")


@pytest.fixture(scope="module")
def rows() -> list[PreferenceRow]:
    long_answer = " ".join(["The tall green tree stands beside the old stone wall"] * 12)  # far over 77 tokens
    return [
        make_row(
            1, "A red square. It is bright; nothing else.", "A blue circle and a green line.", color=(220, 20, 20)
        ),
        make_row(2, "The sky is blue and the grass is green.", "A cat.", color=(30, 30, 220)),
        make_row(3, long_answer, "A tree, but it has no leaves, and it is winter.", color=(20, 160, 20)),
        make_row(4, "42.", "", color=(128, 128, 128)),  # letterless -> whole text; blank -> contributes zero
        make_row(5, "One dot. Two dots. Three dots.", "No dots here.", color=(250, 250, 250)),
    ]


def test_scorer_shape_range_and_determinism(scorer: ClipHardnessScorer, rows: list[PreferenceRow]) -> None:
    delta = scorer.score_pairs(rows, batch_size=2)
    assert delta.shape == (len(rows),)
    assert delta.dtype == torch.float32
    assert torch.isfinite(delta).all()
    assert (delta >= -1).all() and (delta <= 1).all()
    # Row 4's rejected answer is blank: the chosen side holds all the probability mass.
    torch.testing.assert_close(delta[3], torch.tensor(1.0))
    assert torch.equal(scorer.score_pairs(rows, batch_size=2), delta)


def test_scorer_batch_size_invariant(scorer: ClipHardnessScorer, rows: list[PreferenceRow]) -> None:
    one = scorer.score_pairs(rows, batch_size=1)
    three = scorer.score_pairs(rows, batch_size=3)
    torch.testing.assert_close(one, three, atol=1e-5, rtol=0)


def test_scorer_matches_clip_forward(tiny_clip: Path, scorer: ClipHardnessScorer) -> None:
    # Independent check through CLIPModel.forward: its logits_per_image for the row's sub-sentences, softmaxed.
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    row = make_row(1, "A red square. It is bright.", "A blue circle; a line.", color=(220, 20, 20))
    texts = ["A red square", "It is bright", "A blue circle", "a line"]
    inputs = processor(text=texts, images=[row.images[0].load()], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**inputs).logits_per_image[0]
        cosine = logits / model.logit_scale.exp()
    probabilities = logits.softmax(dim=-1)
    expected_joint = probabilities[:2].sum() - probabilities[2:].sum()
    expected_mean = cosine[:2].mean() - cosine[2:].mean()

    torch.testing.assert_close(scorer.score_pairs([row])[0], expected_joint, atol=1e-5, rtol=0)
    mean_scorer = ClipHardnessScorer(model, processor, name="tiny", aggregation="mean_cosine")
    torch.testing.assert_close(mean_scorer.score_pairs([row])[0], expected_mean, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scorer_on_cuda_matches_cpu(tiny_clip: Path, scorer: ClipHardnessScorer, rows: list[PreferenceRow]) -> None:
    on_cpu = scorer.score_pairs(rows, batch_size=2)
    on_cuda = ClipHardnessScorer.from_pretrained(tiny_clip, device="cuda").score_pairs(rows, batch_size=2)
    assert on_cuda.device.type == "cpu" and on_cuda.dtype == torch.float32
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-4, rtol=0)
    for dtype in ("bfloat16", "float16"):
        low = ClipHardnessScorer.from_pretrained(tiny_clip, device="cuda", dtype=dtype).score_pairs(rows, batch_size=3)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert (low.abs() <= 1).all()
        torch.testing.assert_close(low, on_cpu, atol=0.1, rtol=0)


def test_scorer_reports_progress(scorer: ClipHardnessScorer, rows: list[PreferenceRow]) -> None:
    calls: list[tuple[int, int]] = []
    scorer.score_pairs(rows, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_scorer_rejects_row_without_image(scorer: ClipHardnessScorer) -> None:
    with pytest.raises(ValueError, match=r"row 7 \(id 'r7'\) has no image"):
        scorer.score_pairs([make_row(1), make_row(7, with_image=False)])


def test_compute_hardness_with_clip(tiny_clip: Path, rows: list[PreferenceRow]) -> None:
    config = HardnessConfig(scorer=str(tiny_clip), batch_size=2, device="cpu")
    result = compute_hardness(rows, config)
    assert result.source == f"clip:{tiny_clip}"
    assert result.aggregation == "joint_softmax"
    assert result.delta.shape == (5,)
    # DAMA.md 1.3: delta_bar is the mean of this data, not a constant
    assert result.mean == pytest.approx(float(result.delta.mean()), abs=1e-7)

    mean_result = compute_hardness(rows, HardnessConfig(scorer=str(tiny_clip), aggregation="mean_cosine", device="cpu"))
    assert mean_result.aggregation == "mean_cosine"
    assert not torch.allclose(mean_result.delta, result.delta)


# ---------------------------------------------------------------------------------------------------------------
# Section 1.5: user-supplied scores
# ---------------------------------------------------------------------------------------------------------------


def test_user_hardness_paths() -> None:
    assert user_hardness([make_row(1), make_row(2)]) is None
    by_hardness = user_hardness([make_row(1, hardness=0.5), make_row(2, hardness=-0.25)])
    assert by_hardness is not None and by_hardness.tolist() == [0.5, -0.25]
    # delta = chosen_score - rejected_score: 0.75 - 0.25 = 0.5; 1 - 3 = -2
    by_scores = user_hardness(
        [make_row(1, chosen_score=0.75, rejected_score=0.25), make_row(2, chosen_score=1.0, rejected_score=3.0)]
    )
    assert by_scores is not None and by_scores.tolist() == [0.5, -2.0]


def test_user_hardness_precedence() -> None:
    # hardness takes precedence over the two scores, row by row
    rows = [
        make_row(1, hardness=0.125, chosen_score=9.0, rejected_score=0.0),  # hardness wins: 0.125
        make_row(2, chosen_score=2.0, rejected_score=1.5),  # 2.0 - 1.5 = 0.5
    ]
    delta = user_hardness(rows)
    assert delta is not None and delta.tolist() == [0.125, 0.5]


def test_user_hardness_partial_scores_name_the_row() -> None:
    rows = [make_row(1, hardness=0.5), make_row(2, chosen_score=1.0), make_row(3)]
    with pytest.raises(ValueError, match=r"row 2 \(id 'r2'\) lacks hardness or chosen_score/rejected_score"):
        user_hardness(rows)
    with pytest.raises(ValueError, match=r"row 2 .* non-finite"):
        user_hardness([make_row(1, hardness=0.5), make_row(2, hardness=math.nan)])


def test_compute_hardness_with_user_scores_loads_no_model() -> None:
    rows = [make_row(1, hardness=0.5), make_row(2, hardness=-0.25), make_row(3, hardness=1.0)]
    result = compute_hardness(rows, HardnessConfig(scorer="/nonexistent/clip"))
    assert result.source == "user"
    assert result.aggregation == "user_scores"
    assert result.delta.tolist() == [0.5, -0.25, 1.0]
    assert result.mean == pytest.approx(1.25 / 3)  # (0.5 - 0.25 + 1) / 3
    with pytest.raises(ValueError, match="no rows"):
        compute_hardness([], HardnessConfig())


def test_minmax_rescale_hand_computed() -> None:
    # min -0.6, max 1.0: delta' = 2 (delta + 0.6) / 1.6 - 1
    delta = torch.tensor([0.2, 0.5, 1.0, -0.6])
    assert rescale_minmax(delta).tolist() == pytest.approx([0.0, 0.375, 1.0, -1.0], abs=1e-6)  # float32 inputs
    assert rescale_minmax(torch.tensor([0.3, 0.3])).tolist() == [0.0, 0.0]  # no spread: no ordering to keep

    rows = [make_row(i, hardness=value) for i, value in enumerate([0.2, 0.5, 1.0, -0.6])]
    as_given = compute_hardness(rows, HardnessConfig(scorer="/nonexistent/clip"))
    rescaled = compute_hardness(rows, HardnessConfig(scorer="/nonexistent/clip", rescale="minmax"))
    assert as_given.delta.tolist() == pytest.approx([0.2, 0.5, 1.0, -0.6]) and as_given.aggregation == "user_scores"
    assert rescaled.delta.tolist() == pytest.approx([0.0, 0.375, 1.0, -1.0], abs=1e-6)
    assert rescaled.aggregation == "user_scores_minmax" and rescaled.source == "user"
    assert rescaled.mean == pytest.approx(0.09375, abs=1e-6)  # (0 + 0.375 + 1 - 1) / 4
    # alpha_D = sigma(delta) / sigma(delta_bar) spans what joint_softmax's [-1, 1] gives: sigma(+-1) / sigma(0.09375)
    alpha = torch.sigmoid(rescaled.delta.double()) / torch.sigmoid(torch.tensor(rescaled.mean, dtype=torch.float64))
    sigma = torch.sigmoid(torch.tensor([-1.0, 1.0], dtype=torch.float64)) / torch.sigmoid(torch.tensor(0.09375))
    assert [float(alpha.min()), float(alpha.max())] == pytest.approx(sigma.tolist())

    assert describe_hardness(rows, HardnessConfig(rescale="minmax")).startswith("user-supplied scores, rescaled")
    assert "as given" in describe_hardness(rows, HardnessConfig())
    unscored = [make_row(1)]
    assert (
        describe_hardness(unscored, HardnessConfig())
        == f"CLIP `{HardnessConfig().scorer}`, joint_softmax (delta in [-1, 1])"
    )


def test_held_out_pairs_scored_by_clip_get_buckets(tiny_clip: Path, rows: list[PreferenceRow]) -> None:
    config = parse_evaluation_config(
        {"model": {"name_or_path": "m"}, "data": {"preference": "held-out"}, "hardness": {"scorer": str(tiny_clip)}}
    )
    delta, source = _preference_hardness(config, rows, torch.device("cpu"), Callback())
    assert delta is not None and source == f"clip:{tiny_clip}"
    no_scorer = config.model_copy(update={"hardness": config.hardness.model_copy(update={"scorer": None})})
    assert _preference_hardness(no_scorer, rows, torch.device("cpu"), Callback()) == (None, None)
    logps = [torch.randn(len(rows), dtype=torch.float64) for _ in range(4)]
    metrics = preference_metrics(*logps, beta=0.1, hardness=delta)
    assert metrics["buckets"] is not None
    assert sum(block["count"] for block in metrics["buckets"].values()) == len(rows)


# ---------------------------------------------------------------------------------------------------------------
# Config, results on disk, cache key
# ---------------------------------------------------------------------------------------------------------------


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"hardness\.aggregation"):
        HardnessConfig(aggregation="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"hardness\.splitter"):
        HardnessConfig(splitter="llm")
    with pytest.raises(ValueError, match=r"hardness\.batch_size"):
        HardnessConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"hardness\.dtype"):
        HardnessConfig(dtype="int8")


@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_result_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    result = HardnessResult(
        delta=torch.tensor([0.1, -0.3, 0.7]), mean=0.1666, source="clip:x", aggregation="mean_cosine"
    )
    path = tmp_path / f"hardness{suffix}"
    result.save(path)
    loaded = HardnessResult.load(path)
    assert torch.equal(loaded.delta, result.delta)
    assert (loaded.mean, loaded.source, loaded.aggregation) == (0.1666, "clip:x", "mean_cosine")


def test_result_save_rejects_unknown_suffix(tmp_path: Path) -> None:
    result = HardnessResult(delta=torch.zeros(1), mean=0.0, source="user", aggregation="user_scores")
    with pytest.raises(ValueError, match=r"\.pt or \.json"):
        result.save(tmp_path / "hardness.csv")


def test_cache_key() -> None:
    rows = [make_row(1), make_row(2, color=(0, 0, 255))]
    config = HardnessConfig()
    key = hardness_cache_key(rows, config)
    assert len(key) == 64 and key == hardness_cache_key(list(rows), HardnessConfig())
    # batch size and device do not change the numbers, so they do not change the key
    assert hardness_cache_key(rows, HardnessConfig(batch_size=7, device="cpu")) == key
    changed = [
        hardness_cache_key(rows, HardnessConfig(aggregation="mean_cosine")),
        hardness_cache_key(rows, HardnessConfig(scorer="other/clip")),
        hardness_cache_key(rows, HardnessConfig(dtype="bfloat16")),
        hardness_cache_key([make_row(1), make_row(2, color=(0, 0, 254))], config),  # image bytes
        hardness_cache_key([make_row(1), make_row(2, "A red square!", color=(0, 0, 255))], config),  # text
        hardness_cache_key([make_row(1), make_row(3, color=(0, 0, 255))], config),  # row id
        hardness_cache_key([make_row(1, hardness=0.5), make_row(2, color=(0, 0, 255))], config),  # user score
        hardness_cache_key(rows[::-1], config),  # order
        hardness_cache_key(rows, HardnessConfig(rescale="minmax")),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_training_and_its_evaluation_build_the_same_hardness_config(tmp_path: Path) -> None:
    """One builder (HardnessConfig.from_settings) for both: the evaluation after a CLIP-scored run scores with every
    hardness setting of the run, its splitter and batch size included (the evaluation's copy once dropped them)."""
    from dama_engine.config import parse_config
    from dama_engine.evaluation.config import after_training_config

    config = parse_config(
        {
            "model": {"name_or_path": str(tmp_path / "model")},
            "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
            "objective": {"method": "dama"},
            "hardness": {"scorer": "my/clip", "aggregation": "mean_cosine", "batch_size": 7, "rescale": "minmax"},
        }
    )
    rows = [make_row(1)]  # no hardness: the run scores with CLIP
    evaluation = after_training_config(config, tmp_path / "adapter", tmp_path, train_rows=rows, held_out=True)
    trained = HardnessConfig.from_settings(config.hardness, device="cpu")
    evaluated = HardnessConfig.from_settings(evaluation.hardness, device="cpu")
    assert evaluated == trained
    assert (trained.scorer, trained.aggregation, trained.batch_size, trained.splitter) == (
        "my/clip",
        "mean_cosine",
        7,
        "rule",
    )
