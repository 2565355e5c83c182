"""VQA accuracy: the official formula, normalization, and where the two variants differ."""
from __future__ import annotations

import pytest

from vlmkit.errors import UserError
from vlmkit.metrics.vqa import normalize_answer, question_accuracy, vqa_accuracy


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("the dog", "dog"), ("yes.", "yes"), ("3.5", "3.5"), ("1,000", "1000"),
    ("dont", "don't"), ("black-and-white", "black and white"), ("a  cat ", "cat"), ("none", "0"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_official_formula_values(matches, expected):
    answers = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert question_accuracy("cat", answers) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, answers, official, lavis", [
    ("Yes", ["yes"] * 10, 0.0, 1.0),           # all agree: official compares raw strings
    ("two", ["2"] * 10, 0.0, 1.0),
    ("the dog", ["dog"] * 10, 0.0, 1.0),
    ("two", ["2"] * 3 + ["3"] * 7, 0.9, 0.9),   # disagreement: both normalize
    ("yes", ["yes"] * 10, 1.0, 1.0),
])
def test_variants_differ_only_when_answers_agree(prediction, answers, official, lavis):
    assert question_accuracy(prediction, answers, "official") == pytest.approx(official)
    assert question_accuracy(prediction, answers, "lavis") == pytest.approx(lavis)


def test_single_answer_uses_normalized_exact_match():
    assert question_accuracy("Two", ["2"]) == 1.0
    assert question_accuracy("three", ["2"]) == 0.0


def test_report_overall_and_per_type():
    references = {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        2: {"answers": ["2"] * 10, "answer_type": "number", "question_type": "how many"},
        3: {"answers": ["red"] * 2 + ["blue"] * 8, "answer_type": "other", "question_type": "what color"},
    }
    result = vqa_accuracy({1: "yes", 2: "two", 3: "Red"}, references)
    assert result["n"] == 3
    assert result["per_answer_type"] == {"number": 0.0, "other": pytest.approx(0.6), "yes/no": 1.0}
    assert result["accuracy"] == pytest.approx((1.0 + 0.0 + 0.6) / 3)
    assert set(result["per_question_type"]) == {"is the", "how many", "what color"}
    assert vqa_accuracy({1: "yes", 2: "two", 3: "Red"}, references, "lavis")["accuracy"] == pytest.approx(2.6 / 3)


def test_malformed_vqa_input():
    with pytest.raises(UserError, match="question 5 has a prediction but no reference"):
        vqa_accuracy({5: "yes"}, {1: {"answers": ["yes"]}})
    with pytest.raises(UserError, match="question 1 has reference answers but no prediction"):
        vqa_accuracy({5: "yes"}, {5: {"answers": ["yes"]}, 1: {"answers": ["no"]}})
    with pytest.raises(UserError, match="unknown VQA variant"):
        vqa_accuracy({1: "yes"}, {1: {"answers": ["yes"]}}, variant="blip")
