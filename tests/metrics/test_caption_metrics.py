"""BLEU, ROUGE-L and CIDEr-D against pycocoevalcap: stored reference numbers and live randomized sets."""
from __future__ import annotations

import random

import numpy as np
import pytest

from vlmkit.errors import UserError
from vlmkit.metrics.bleu import bleu_scores
from vlmkit.metrics.caption import score_captions
from vlmkit.metrics.cider import cider_scores
from vlmkit.metrics.ptb import tokenize
from vlmkit.metrics.rouge import lcs_lengths, rouge_l_scores
from vlmkit.metrics.synthetic import random_corpus

TOLERANCE = 1e-9


def _tokenized_reference(reference_numbers):
    gts = reference_numbers["tokenized"]["gts"]
    res = reference_numbers["tokenized"]["res"]
    keys = list(res)
    return [res[k][0] for k in keys], [gts[k] for k in keys]


def test_reference_numbers_from_tokenized_text(reference_numbers):
    hyps, refs = _tokenized_reference(reference_numbers)
    corpus, per = bleu_scores(hyps, refs)
    np.testing.assert_allclose(corpus, reference_numbers["Bleu"]["corpus"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(per, reference_numbers["Bleu"]["per_image"], rtol=0, atol=TOLERANCE)
    corpus, per = rouge_l_scores(hyps, refs)
    assert abs(corpus - reference_numbers["ROUGE_L"]["corpus"]) <= TOLERANCE
    np.testing.assert_allclose(per, reference_numbers["ROUGE_L"]["per_image"], rtol=0, atol=TOLERANCE)
    corpus, per = cider_scores(hyps, refs)
    assert abs(corpus - reference_numbers["CIDEr"]["corpus"]) <= TOLERANCE
    np.testing.assert_allclose(per, reference_numbers["CIDEr"]["per_image"], rtol=0, atol=TOLERANCE)


def test_reference_numbers_end_to_end_from_raw_captions(reference_numbers):
    raw = reference_numbers["input_raw"]
    predictions = {k: v[0]["caption"] for k, v in raw["res"].items()}
    references = {k: [c["caption"] for c in v] for k, v in raw["gts"].items()}
    assert tokenize([predictions[k] for k in predictions]) == [
        reference_numbers["tokenized"]["res"][k][0] for k in predictions]
    result = score_captions(predictions, references, per_image=True)
    for k in range(4):
        assert abs(result[f"BLEU-{k + 1}"] - reference_numbers["Bleu"]["corpus"][k]) <= TOLERANCE
    assert abs(result["ROUGE-L"] - reference_numbers["ROUGE_L"]["corpus"]) <= TOLERANCE
    assert abs(result["CIDEr"] - reference_numbers["CIDEr"]["corpus"]) <= TOLERANCE
    assert result["n"] == 3 and set(result["per_image"]) == set(predictions)


@pytest.mark.parametrize("seed, n_images, n_refs, tricky", [(0, 600, 5, 0.3), (1, 300, 3, 0.8), (2, 50, 7, 0.1)])
def test_live_parity_on_randomized_sets(coco_scorers, seed, n_images, n_refs, tricky):
    Bleu, Rouge, Cider = coco_scorers
    predictions, references = random_corpus(n_images, n_refs, seed=seed, tricky=tricky)
    rng = random.Random(seed)
    ids = list(predictions)
    for image_id in ids:  # vary the number of references per image
        references[image_id] = references[image_id][:rng.randint(1, n_refs)]
    hyps = tokenize([predictions[i] for i in ids])
    flat = tokenize([c for i in ids for c in references[i]])
    refs, start = [], 0
    for i in ids:
        refs.append(flat[start:start + len(references[i])])
        start += len(references[i])
    gts = {i: refs[j] for j, i in enumerate(ids)}
    res = {i: [hyps[j]] for j, i in enumerate(ids)}

    expected_corpus, expected_per = Bleu(4).compute_score(gts, res, verbose=0)
    corpus, per = bleu_scores(hyps, refs)
    np.testing.assert_allclose(corpus, expected_corpus, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(per, expected_per, rtol=0, atol=TOLERANCE)
    expected_corpus, expected_per = Rouge().compute_score(gts, res)
    corpus, per = rouge_l_scores(hyps, refs)
    assert abs(corpus - expected_corpus) <= TOLERANCE
    np.testing.assert_allclose(per, expected_per, rtol=0, atol=TOLERANCE)
    expected_corpus, expected_per = Cider().compute_score(gts, res)
    corpus, per = cider_scores(hyps, refs)
    assert abs(corpus - expected_corpus) <= TOLERANCE
    np.testing.assert_allclose(per, expected_per, rtol=0, atol=TOLERANCE)
    assert corpus > 0.1  # the set is not degenerate


def test_single_image_cider_is_zero_and_empty_tokenization_is_scored():
    assert cider_scores(["a dog"], [["a dog"]])[0] == 0.0
    # a caption made only of dropped punctuation tokenizes to "" and still gets a score
    result = score_captions({1: "...", 2: "a dog runs"}, {1: ["a cat"], 2: ["a dog runs fast"]})
    assert result["n"] == 2


def test_lcs_long_sentences_fall_back_and_agree():
    rng = random.Random(0)
    a = [[rng.choice("abcde") for _ in range(rng.randint(1, 80))] for _ in range(40)]
    b = [[rng.choice("abcde") for _ in range(rng.randint(1, 80))] for _ in range(40)]
    from vlmkit.metrics.rouge import _lcs_python
    assert lcs_lengths(a, b).tolist() == [_lcs_python(x, y) for x, y in zip(a, b)]


@pytest.mark.parametrize("predictions, references, message", [
    ({1: "a dog"}, {2: ["a dog"]}, "image 1 has a prediction but no references"),
    ({1: "  "}, {1: ["a dog"]}, "prediction for image 1 is empty"),
    ({1: "a dog"}, {1: ["a dog", ""]}, "empty or non-string reference"),
    ({1: "a dog", }, {1: ["a dog"], 2: ["a cat"]}, "image 2 has references but no prediction"),
])
def test_malformed_input_names_the_entry(predictions, references, message):
    with pytest.raises(UserError, match=message):
        score_captions(predictions, references)


def test_spice_and_unknown_metrics_are_clear_errors():
    with pytest.raises(UserError, match="SPICE is not available"):
        score_captions({1: "a"}, {1: ["a"]}, metrics=["spice"])
    with pytest.raises(UserError, match="unknown caption metric 'blue'"):
        score_captions({1: "a"}, {1: ["a"]}, metrics=["blue"])
