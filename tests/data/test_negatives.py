"""NegCLIP-style hard negative captions: same words, another meaning."""
import random

import pytest

from vlmkit.data.negatives import KINDS, SPATIAL_OPPOSITES, hard_negative, validate_kinds


def test_spatial_negatives_flip_one_spatial_word():
    rng = random.Random(0)
    assert hard_negative("a red star left of a blue circle", rng, ("spatial",)) == "a red star right of a blue circle"
    assert hard_negative("In the top left there is a star.", random.Random(1), ("spatial",)) in (
        "In the bottom left there is a star.", "In the top right there is a star.")
    assert hard_negative("Above the line", rng, ("spatial",)) == "Below the line"  # keeps the capital
    assert hard_negative("a red star", rng, ("spatial",)) is None
    assert all(SPATIAL_OPPOSITES[SPATIAL_OPPOSITES[word]] == word for word in SPATIAL_OPPOSITES)


def test_swap_negatives_exchange_two_different_content_words():
    seen = set()
    for seed in range(60):
        negative = hard_negative("a red star and a blue circle", random.Random(seed), ("swap",))
        assert sorted(negative.split()) == sorted("a red star and a blue circle".split())
        assert negative != "a red star and a blue circle"
        seen.add(negative)
    assert "a blue star and a red circle" in seen and "a red circle and a blue star" in seen  # re-bound attributes
    assert not any(text.startswith("and") or text.split()[0] != "a" for text in seen)  # function words stay
    assert hard_negative("a star", random.Random(0), ("swap",)) is None
    assert hard_negative("star star", random.Random(0), ("swap",)) is None  # nothing different to swap


def test_kinds_are_tried_in_a_seeded_order_and_validated():
    text = "a red star left of a blue circle"
    draws = [hard_negative(text, random.Random(seed)) for seed in range(40)]
    assert draws == [hard_negative(text, random.Random(seed)) for seed in range(40)]
    assert any("right of" in d for d in draws) and any("left of" in d for d in draws)  # both kinds drawn
    assert hard_negative("star", random.Random(0)) is None
    assert validate_kinds(["swap"]) == ("swap",) and set(KINDS) == {"spatial", "swap"}
    with pytest.raises(ValueError, match="verbs"):
        validate_kinds(["verbs"])
