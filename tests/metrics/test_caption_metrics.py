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
from vlmkit.metrics.rouge import rouge_l_scores
from vlmkit.metrics.synthetic import random_corpus

from metrics_helpers import lcs_lengths, lookup

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


def _split_encoding_directly(sentences):
    """The `str.split()` encoding computed word by word (what `encode_both` used to do)."""
    token_lists = [s.split() for s in sentences]
    words = [word for tokens in token_lists for word in tokens]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    return np.array([vocab[w] for w in words], dtype=np.int64), np.array([len(t) for t in token_lists], dtype=np.int64)


@pytest.mark.parametrize("few_irregular", [256, 1, 10 ** 9])  # as shipped, always expand, always in place
def test_split_encoding_derived_from_space_encoding_is_exact(few_irregular, monkeypatch):
    from vlmkit.metrics import ngrams
    from vlmkit.metrics.ngrams import encode_both
    from vlmkit.metrics.synthetic import random_caption

    monkeypatch.setattr(ngrams, "_FEW_IRREGULAR", few_irregular)
    rng = random.Random(5)
    for tricky, style in [(0.1, "coco"), (0.7, "varied"), (0.9, "varied")]:
        sentences = tokenize([random_caption(rng, tricky=tricky, style=style) for _ in range(3000)])
        sentences += ["", "a\u00a0b c", "", "x", "a b\u00a0a", "\u00a0", "b\u00a0\u00a0c d"]
        ids, lengths = encode_both(sentences)[1]
        expected_ids, expected_lengths = _split_encoding_directly(sentences)
        assert ids.tolist() == expected_ids.tolist() and lengths.tolist() == expected_lengths.tolist()


def test_bit_parallel_lcs_agrees_for_every_width():
    from vlmkit.metrics.rouge import _lcs_python

    rng = random.Random(1)
    for width in (1, 7, 8, 9, 16, 17, 32, 33, 63):
        a = [[rng.choice("abcde") for _ in range(rng.randint(0, width))] for _ in range(200)]
        b = [[rng.choice("abcdf") for _ in range(rng.randint(0, width))] for _ in range(200)]
        assert lcs_lengths(a, b).tolist() == [_lcs_python(x, y) for x, y in zip(a, b)], width


def _cider_by_pairs(hyps, refs, counts, n=4, sigma=6.0):
    """CIDEr-D from the same counts with the plain formulas: a dict per sentence and order."""
    import math
    from collections import defaultdict

    num_hyp = len(hyps)
    vec = defaultdict(dict)
    for s, g, o, c in zip(counts.sentence.tolist(), counts.gram.tolist(), counts.order.tolist(), counts.count.tolist()):
        vec[s, o][g] = c
    df = defaultdict(int)
    first = num_hyp
    for image, image_refs in enumerate(refs):
        grams = set()
        for j in range(len(image_refs)):
            for o in range(n):
                grams.update(vec[first + j, o])
        for g in grams:
            df[g] += 1
        first += len(image_refs)
    log_n = math.log(float(num_hyp))

    def weights(s, o):
        return {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in vec[s, o].items()}

    scores, first = [], num_hyp
    for image, image_refs in enumerate(refs):
        total = 0.0
        for j in range(len(image_refs)):
            for o in range(n):
                h, r = weights(image, o), weights(first + j, o)
                dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in h.items())
                norm = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(sum(v * v for v in r.values()))
                sim = dot / norm if norm != 0 else dot
                delta = max(int(counts.lengths[image]) - 1, 0) - max(int(counts.lengths[first + j]) - 1, 0)
                total += sim * math.e ** (-(delta ** 2) / (2 * sigma ** 2))
        scores.append(total / n / len(image_refs) * 10.0)
        first += len(image_refs)
    return scores


def test_cider_sorted_layout_and_shared_reference_table_match_plain_formulas():
    """CIDEr-D's (order, image, reference, gram) row layout and the reference table it shares
    with BLEU give the plain per-pair formulas' scores, with BLEU run first or not."""
    from vlmkit.metrics.ngrams import count_caption_ngrams

    predictions, references = random_corpus(120, 5, seed=4, tricky=0.5)
    rng = random.Random(4)
    ids = list(predictions)
    refs = [tokenize(references[i][:rng.randint(1, 5)]) for i in ids]
    hyps = tokenize([predictions[i] for i in ids])
    counts = count_caption_ngrams(hyps, refs)
    expected = _cider_by_pairs(hyps, refs, counts)
    alone = cider_scores(hyps, refs, counts=counts)[1]
    bleu_scores(hyps, refs, counts=counts)  # fills the shared table
    after_bleu = cider_scores(hyps, refs, counts=counts)[1]
    np.testing.assert_allclose(alone, expected, rtol=0, atol=1e-12)
    assert after_bleu == alone


def test_bit_parallel_lcs_same_with_16_and_64_bit_ids():
    """The 16-bit comparison path (small vocabularies) equals the 64-bit one (large ids)."""
    from vlmkit.metrics.rouge import _lcs_bit_parallel

    rng = np.random.default_rng(2)
    a = rng.integers(0, 6, size=(300, 20))
    b = rng.integers(0, 6, size=(300, 40))
    b_len = rng.integers(0, 41, size=300)
    b = np.where(np.arange(40)[None, :] < b_len[:, None], b, -2)
    small = _lcs_bit_parallel(a, b, b_len)
    shift = 1 << 40  # ids far above the 16-bit range keep the 64-bit path
    large = _lcs_bit_parallel(a + shift, np.where(b >= 0, b + shift, b), b_len)
    assert small.tolist() == large.tolist()


class _Caption(str):
    pass


@pytest.mark.parametrize("references", [
    {1: ("a dog", "a cat")}, {1: [_Caption("a dog")]}, {1: ["a dog", _Caption("a cat ")]},
])
def test_validation_fast_path_accepts_what_the_full_checks_accept(references):
    assert score_captions({1: "a dog"}, references, metrics=("bleu",))["n"] == 1


@pytest.mark.parametrize("references, message", [
    ({1: ("a dog", " ")}, "empty or non-string reference"),
    ({1: ["a dog", 3]}, "empty or non-string reference"),
    ({1: "a dog"}, "must be a non-empty list"),
    ({1: []}, "must be a non-empty list"),
    ({1: ["a dog"], 2: ("a cat",)}, "image 2 has references but no prediction"),
])
def test_validation_fast_path_rejects_what_the_full_checks_reject(references, message):
    with pytest.raises(UserError, match=message):
        score_captions({1: "a dog"}, references)


@pytest.mark.parametrize("empty_hypotheses", [False, True])
def test_reference_join_matches_dict_lookups(empty_hypotheses):
    """`reference_join`'s grouped sort gives the clip counts and hypothesis rows that dict
    look-ups on (order, image, gram) give, and the reference table BLEU and CIDEr-D share."""
    from vlmkit.metrics.ngrams import count_caption_ngrams, reference_join

    predictions, references = random_corpus(150, 4, seed=7, tricky=0.5)
    rng = random.Random(7)
    ids = list(predictions)
    refs = [tokenize(references[i][:rng.randint(1, 4)]) for i in ids]
    hyps = [""] * len(ids) if empty_hypotheses else tokenize([predictions[i] for i in ids])
    counts = count_caption_ngrams(hyps, refs)
    num_hyp = len(hyps)
    ref_image = np.repeat(np.arange(num_hyp), [len(r) for r in refs])
    join = reference_join(counts, ref_image, num_hyp)

    rows = list(zip(counts.sentence.tolist(), counts.order.tolist(), counts.gram.tolist(), counts.count.tolist()))
    image_of = lambda s: s if s < num_hyp else int(ref_image[s - num_hyp])  # noqa: E731
    hyp_row, largest = {}, {}
    for row, (s, o, g, c) in enumerate(rows):
        if s < num_hyp:
            hyp_row[o, s, g] = row
        else:
            largest[o, image_of(s), g] = max(largest.get((o, image_of(s), g), 0), c)
    assert join.hyp_clip.tolist() == [largest.get((o, s, g), 0) for s, o, g, _ in rows if s < num_hyp]
    assert join.row_match.tolist() == [hyp_row.get((o, image_of(s), g), -1) for s, o, g, _ in rows]
    table = sorted((counts.keys(np.array([i]), num_hyp, gram=np.array([g]), order=np.array([o]))[0], c, g)
                   for (o, i, g), c in largest.items())
    assert join.key.tolist() == [t[0] for t in table]
    assert join.max_count.tolist() == [t[1] for t in table]
    assert join.gram.tolist() == [t[2] for t in table]


def test_renumber_bitmap_and_sort_paths_agree():
    """Dense n-gram ids from the bitmap (no sort) equal those of the sorting path, both 32-bit."""
    from vlmkit.metrics import ngrams

    rng = np.random.default_rng(3)
    for bound in (1, 50, 5000, 4_000_000):
        codes = rng.integers(0, bound, size=20000)
        bitmap_ids, bitmap_size = ngrams._renumber(codes, bound)
        limit = ngrams._BITMAP_LIMIT
        ngrams._BITMAP_LIMIT = 0
        try:
            sort_ids, sort_size = ngrams._renumber(codes, bound)
        finally:
            ngrams._BITMAP_LIMIT = limit
        assert bitmap_size == sort_size and bitmap_ids.dtype == sort_ids.dtype == np.int32  # ids < 2**31
        assert bitmap_ids.tolist() == sort_ids.tolist()


@pytest.mark.parametrize("keys", ["int32", "int64", "too large"])
def test_image_layout_counts_and_join_equal_sentence_layout(keys, monkeypatch):
    """`count_caption_ngrams` (one sort in (order, image, gram, slot) layout, join included)
    gives the same (sentence, gram) counts as `count_ngrams_encoded`, the same join as
    `reference_join` on those, each sentence's rows in the same gram order, and `lookup` works;
    also on the fallback path for key ranges that would overflow, and with images that have
    no reference."""
    from vlmkit.metrics import ngrams

    if keys == "int64":
        monkeypatch.setattr(ngrams, "_INT32_KEY_LIMIT", 1)
    if keys == "too large":
        monkeypatch.setattr(ngrams, "_IMAGE_KEY_LIMIT", 1)
    predictions, references = random_corpus(200, 5, seed=11, tricky=0.5)
    rng = random.Random(11)
    ids = list(predictions)
    refs = [tokenize(references[i][:rng.randint(0, 5)]) for i in ids]
    hyps = tokenize([predictions[i] for i in ids])
    hyps[3] = ""
    sentences = hyps + [r for image_refs in refs for r in image_refs]
    encoded = ngrams.encode_words(sentences)
    counts = ngrams.count_caption_ngrams(hyps, refs, encoded=encoded)
    plain = ngrams.count_ngrams_encoded(*encoded)
    num_hyp = len(hyps)
    ref_image = np.repeat(np.arange(num_hyp), [len(r) for r in refs])

    def rows(c):
        return [(s, o, g, n) for s, o, g, n in zip(c.sentence.tolist(), c.order.tolist(), c.gram.tolist(),
                                                  c.count.tolist())]
    assert np.all(np.diff(counts.key) > 0)
    assert counts.key.dtype == {"int32": np.int32, "int64": np.int64, "too large": np.int64}[keys]
    # same rows, and within each (sentence, order) the same sequence of grams
    assert sorted(rows(counts)) == sorted(rows(plain))
    by_sentence: dict = {}
    for s, o, g, _ in rows(counts):
        by_sentence.setdefault((s, o), []).append(g)
    assert all(grams == sorted(grams) for grams in by_sentence.values())

    join = ngrams.reference_join(counts, ref_image, num_hyp)  # the one computed with the counts
    counts_again = ngrams.count_caption_ngrams(hyps, refs, encoded=encoded)
    counts_again._reference_join = None
    recomputed = ngrams.reference_join(counts_again, ref_image, num_hyp)
    for field in ("key", "max_count", "gram", "hyp_clip", "row_match"):
        assert getattr(join, field).tolist() == getattr(recomputed, field).tolist(), field

    # the same scores to the last bit as from the sentence layout (every image with a reference)
    some_refs = [image_refs or ["a"] for image_refs in refs]
    this_layout = ngrams.count_caption_ngrams(hyps, some_refs)
    monkeypatch.setattr(ngrams, "_IMAGE_KEY_LIMIT", 1)
    sentence_layout = ngrams.count_caption_ngrams(hyps, some_refs)
    assert bleu_scores(hyps, some_refs, counts=this_layout) == bleu_scores(hyps, some_refs, counts=sentence_layout)
    assert cider_scores(hyps, some_refs, counts=this_layout) == cider_scores(hyps, some_refs, counts=sentence_layout)

    query_sentence, query_gram = plain.sentence[::7], plain.gram[::7]
    assert lookup(counts, query_sentence, query_gram).tolist() == plain.count[::7].tolist()
    assert lookup(plain, query_sentence, query_gram).tolist() == plain.count[::7].tolist()


def test_score_captions_restores_the_garbage_collector():
    import gc

    import pytest

    from vlmkit.errors import UserError
    from vlmkit.metrics.caption import score_captions

    assert gc.isenabled()
    score_captions({1: "a dog"}, {1: ["a dog runs"]})
    assert gc.isenabled()
    with pytest.raises(UserError):
        score_captions({1: ""}, {1: ["a dog"]})
    assert gc.isenabled()
    gc.disable()
    try:
        score_captions({1: "a dog"}, {1: ["a dog runs"]})
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


@pytest.mark.parametrize("cores", [1, 2])
def test_order_blocks_sorted_side_by_side_equal_one_sort(cores, monkeypatch):
    """`_sort_order_blocks` (two threads with a second core) sorts like one stable sort, and
    whole scores do not depend on the number of cores."""
    from vlmkit.metrics import ngrams

    monkeypatch.setattr(ngrams, "CORES", cores)
    monkeypatch.setattr(ngrams, "_PARALLEL_SORT_MIN", 10)
    rng = np.random.default_rng(4)
    sizes = [50, 0, 70, 33]
    blocks = [rng.integers(0, 1000, size) + 1000 * k for k, size in enumerate(sizes)]
    key = np.concatenate(blocks).astype(np.int32)
    expected = np.sort(key, kind="stable")
    ngrams._sort_order_blocks(key, np.cumsum([0] + sizes))
    assert key.tolist() == expected.tolist()

    predictions, references = random_corpus(300, 5, seed=9, tricky=0.3)
    monkeypatch.setattr(ngrams, "CORES", 1)
    single = score_captions(predictions, references, per_image=True)
    monkeypatch.setattr(ngrams, "CORES", cores)
    assert score_captions(predictions, references, per_image=True) == single
