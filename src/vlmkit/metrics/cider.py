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

from vlmkit.metrics.ngrams import NgramCounts, count_caption_ngrams, reference_table


def cider_scores(hypotheses: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0,
                 counts: NgramCounts | None = None) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (mean of image scores) and per-image scores, for tokenized strings.

    `counts` may be passed in when already computed by `count_caption_ngrams`.
    """
    num_hyp = len(hypotheses)
    ref_count_per_image = [len(refs) for refs in references]
    ref_image = np.repeat(np.arange(num_hyp, dtype=np.int64), ref_count_per_image)
    num_refs = np.asarray(ref_count_per_image, dtype=np.float64)
    ref_counts = np.asarray(ref_count_per_image, dtype=np.int64)
    first_ref = np.cumsum(ref_counts) - ref_counts + num_hyp  # sentence index of each image's first reference
    if counts is None:
        counts = count_caption_ngrams(hypotheses, references, n)
    num_sentences = len(counts.lengths)

    # Document frequency: images whose references contain the gram.
    is_ref = counts.sentence >= num_hyp
    df = np.bincount(reference_table(counts, ref_image, num_hyp)[2], minlength=counts.num_grams).astype(np.float64)
    log_n = np.log(float(num_hyp))
    weight = counts.count * (log_n - np.log(np.maximum(1.0, df[counts.gram])))  # tf * idf per row

    squared = np.bincount(counts.sentence * n + counts.order, weights=weight * weight,
                          minlength=num_sentences * n)
    norm = np.sqrt(squared).reshape(num_sentences, n)
    length = np.maximum(counts.lengths - 1, 0).astype(np.float64)  # bigram count (see module doc)

    # Every hypothesis gram meets every reference of its image. The rows are laid out as
    # (order, image, reference, gram), i.e. in increasing key order, so the look-ups below
    # search sorted queries (several times faster than scattered ones); each (reference,
    # order) still sums its products in gram order, as before.
    hyp_rows = np.flatnonzero(~is_ref)  # sorted by (order, image, gram)
    hyp_key = counts.order[hyp_rows] * num_hyp + counts.sentence[hyp_rows]
    block_start = np.flatnonzero(np.r_[len(hyp_key) > 0, hyp_key[1:] != hyp_key[:-1]])  # one per (order, image)
    block_size = np.diff(np.r_[block_start, len(hyp_rows)])
    block_image = counts.sentence[hyp_rows[block_start]]
    block_order = counts.order[hyp_rows[block_start]]
    copies = np.repeat(np.arange(len(block_start)), ref_counts[block_image])  # one per (block, reference)
    copy_ref = np.arange(len(copies)) - np.repeat(np.cumsum(ref_counts[block_image]) - ref_counts[block_image],
                                                  ref_counts[block_image])
    copy_sentence = first_ref[block_image[copies]] + copy_ref
    copy_size = block_size[copies]
    copy_offset = np.cumsum(copy_size) - copy_size
    within = np.arange(int(copy_size.sum())) - np.repeat(copy_offset, copy_size)
    row = hyp_rows[np.repeat(block_start[copies], copy_size) + within]
    # the key of (reference, gram) is the hypothesis row's key with the sentence index moved
    # from the image to the reference: key + (reference - image) * (size of the order)
    shift = (copy_sentence - block_image[copies]) * counts.order_size[block_order[copies]]
    query = counts.key[row] + np.repeat(shift, copy_size)
    position = np.minimum(np.searchsorted(counts.key, query), len(counts.key) - 1)
    found = counts.key[position] == query
    ref_weight = np.where(found, weight[position], 0.0)
    hyp_weight = weight[row]
    products = np.minimum(hyp_weight, ref_weight) * ref_weight
    dot = np.bincount(np.repeat(copy_sentence * n + block_order[copies], copy_size), weights=products,
                      minlength=num_sentences * n)
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
