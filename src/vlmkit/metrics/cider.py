"""CIDEr-D exactly as pycocoevalcap computes it (`Cider()`: n = 1..4, sigma = 6).

Each sentence becomes, per n-gram order, a tf-idf vector: raw counts times
log(N) - log(max(1, df)), with df the number of *evaluated images* whose references contain the
n-gram (so the idf depends on the evaluated set, and one image alone scores 0). A hypothesis is
compared with each reference by a clipped cosine: sum(min(h, r) * r) / (|h| |r|), multiplied by
a Gaussian penalty exp(-(l_h - l_r)^2 / (2 sigma^2)); the image score is the mean over orders
and references, times 10. Quirk kept: the reference's "length" counts *bigrams* (a loop-index
slip in pycocoevalcap), i.e. max(0, words - 1).
"""
from __future__ import annotations

import numpy as np

from vlmkit.metrics.ngrams import NgramCounts, count_caption_ngrams, reference_images, reference_join


def cider_scores(hypotheses: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0,
                 counts: NgramCounts | None = None) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (mean of image scores) and per-image scores, for tokenized strings.

    `counts` may be passed in when already computed by `count_caption_ngrams`.
    """
    num_hyp = len(hypotheses)
    ref_count_per_image, ref_image = reference_images(references, num_hyp)
    num_refs = np.asarray(ref_count_per_image, dtype=np.float64)
    if counts is None:
        counts = count_caption_ngrams(hypotheses, references, n)
    num_sentences = len(counts.lengths)

    # Document frequency: images whose references contain the gram.
    join = reference_join(counts, ref_image, num_hyp)
    df = np.bincount(join.gram, minlength=counts.num_grams).astype(np.float64)
    log_n = np.log(float(num_hyp))
    # tf * idf per row; the idf is computed per gram and gathered (the same value for every row
    # of a gram as computing it per row, with one log per distinct gram instead of per row)
    idf = log_n - np.log(np.maximum(1.0, df))
    # (one slot more, 0.0, for the reference rows without a matching hypothesis row below)
    weight = np.empty(len(counts.count) + 1)
    np.multiply(counts.count, idf[counts.gram], out=weight[:-1])
    weight[-1] = 0.0
    del df, idf

    sentence_order = counts.sentence * n + counts.order  # (sentence, order) of every row
    squared = np.square(weight[:-1])
    norm = np.sqrt(np.bincount(sentence_order, weights=squared, minlength=num_sentences * n)).reshape(num_sentences, n)
    del squared
    length = np.maximum(counts.lengths - 1, 0).astype(np.float64)  # bigram count (see module doc)

    # dot[reference, order] = sum over the grams of the reference of min(h, r) * r, h being the
    # hypothesis weight of the same gram in its image (0 when the hypothesis lacks it; the
    # matching row comes from `reference_join`). The reference rows are in key order, (order,
    # reference, gram) or (order, image, gram, slot) (`ngrams._count_and_join`); either way each
    # (reference, order) sums its products in gram order, as when walking the hypothesis grams:
    # only grams on both sides give non-zero products, and the zero products in between leave
    # a float sum unchanged, so the result is the same to the last bit. The products are
    # formed for every row, the hypothesis rows matched with themselves: their sums land in
    # the hypotheses' own (sentence, order) bins, which are not used, so the references'
    # bins get exactly their own products without selecting the reference rows first (and
    # in place: less memory for the call to fill).
    products = weight[join.row_match]  # match -1 (none) picks the final 0.0
    weight = weight[:-1]
    np.minimum(products, weight, out=products)
    products *= weight
    del weight
    dot = np.bincount(sentence_order, weights=products, minlength=num_sentences * n)
    del products, sentence_order
    dot = dot.reshape(num_sentences, n)[num_hyp:]                      # (R, n)

    hyp_of_ref = ref_image
    denominator = norm[hyp_of_ref] * norm[num_hyp:]                    # (R, n)
    similarity = np.where(denominator != 0, dot / np.where(denominator != 0, denominator, 1.0), dot)
    delta = length[hyp_of_ref] - length[num_hyp:]
    similarity = similarity * (np.e ** (-(delta ** 2) / (2 * sigma ** 2)))[:, None]
    per_image_sum = np.stack([np.bincount(hyp_of_ref, weights=similarity[:, k], minlength=num_hyp)
                              for k in range(n)], axis=1)
    scores = per_image_sum.mean(axis=1) / num_refs * 10.0
    return float(np.mean(scores)), [float(s) for s in scores]
