"""ROUGE-L exactly as pycocoevalcap computes it (`Rouge()`, beta = 1.2).

Per image: LCS between the hypothesis and each reference on space-split tokens; precision and
recall are maximised *separately* over references, then F = (1 + b^2) P R / (R + b^2 P). The
corpus score is the mean of image scores. Tokens are `str.split(" ")` here (not `split()`), as
in the reference, so a token holding a non-breaking space stays whole.

The LCS lengths of all (hypothesis, reference) pairs are computed together with the
bit-parallel algorithm of Allison & Dix (1986), one numpy step per hypothesis word.
"""
from __future__ import annotations

import numpy as np

_BETA = 1.2


def _lcs_python(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _lcs_bit_parallel(a_ids: np.ndarray, b_ids: np.ndarray, b_lengths: np.ndarray) -> np.ndarray:
    """LCS lengths of padded id rows (ids >= 0; a padding negative and never equal to b padding;
    b rows <= 63 words).

    Rows are processed in groups by the number of bytes their b needs (up to 8, 16, 32 or 63
    words), each group with unsigned integers of that size and only as many steps as its
    longest a. Both are exact: the additions carry only towards higher bits, so bits below the
    integer size never depend on the bits cut off above them (and bits at or above b's length
    are masked off at the end anyway); an a column that is padding in every row of a group
    matches nothing and leaves every row unchanged.
    """
    result = np.zeros(len(a_ids), dtype=np.int64)
    if len(a_ids) == 0:
        return result
    # The comparisons below read the b matrix once per word of a: with a small vocabulary
    # 16-bit ids move a quarter of the memory of 64-bit ones (same equalities; paddings fit).
    if max(int(a_ids.max(initial=0)), int(b_ids.max(initial=0))) < np.iinfo(np.int16).max:
        a_ids, b_ids = a_ids.astype(np.int16), b_ids.astype(np.int16)
    needed = np.select([b_lengths <= 8, b_lengths <= 16, b_lengths <= 32], [1, 2, 4], 8)
    for nbytes in (1, 2, 4, 8):
        rows = np.flatnonzero(needed == nbytes)
        if len(rows) == 0:
            continue
        bits = 8 * nbytes
        b = b_ids[rows, :bits]
        if b.shape[1] < bits:  # pad b to a whole unsigned integer of bits; -3 never equals an a id
            b = np.concatenate([b, np.full((len(b), bits - b.shape[1]), -3, b.dtype)], axis=1)
        a = a_ids[rows]
        used = np.flatnonzero((a >= 0).any(axis=0))
        steps = int(used[-1]) + 1 if len(used) else 0
        dtype = np.dtype(f"<u{nbytes}")
        v = np.full(len(rows), np.iinfo(dtype).max, dtype=dtype)
        with np.errstate(over="ignore"):
            for step in range(steps):
                # bitmask of the positions in b equal to the current word of a: bit j <- column j
                # (packbits in little bit order, read as a little-endian integer; a row is a
                # whole number of bytes, so packing the flat array packs each row on its own,
                # and far faster than packing along axis 1)
                equal = b == a[:, step:step + 1]
                match = np.packbits(equal.reshape(-1), bitorder="little").view(dtype)
                u = v & match
                v = (v + u) | (v - u)
        v = v.astype(np.uint64)
        mask = (np.uint64(1) << b_lengths[rows].astype(np.uint64)) - np.uint64(1)
        result[rows] = _popcount(~v & mask)
    return result


def _popcount(values: np.ndarray) -> np.ndarray:
    bytes_view = values.astype("<u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(bytes_view, axis=1).sum(axis=1).astype(np.int64)


def rouge_l_scores(hypotheses: list[str], references: list[list[str]],
                   encoded: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, list[float]]:
    """Corpus ROUGE-L (mean of image scores) and per-image scores, for tokenized strings.

    `encoded` may hold the `split(" ")` word ids of hypotheses then references
    (`vlmkit.metrics.ngrams.encode_both(...)[0]`).
    """
    from vlmkit.metrics.ngrams import encode_words, reference_images

    num_hyp = len(hypotheses)
    _, owner = reference_images(references, num_hyp)
    if encoded is None:
        sentences = list(hypotheses)
        for refs in references:
            sentences.extend(refs)
        encoded = encode_words(sentences, " ")
    ids, lengths = encoded
    hyp_len, ref_len = lengths[:num_hyp][owner], lengths[num_hyp:]
    # padded (sentence, position) matrix of word ids; padding differs between the two sides
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    width = max(int(lengths.max()) if len(lengths) else 1, 1)
    matrix = np.full((len(lengths), width), -1, dtype=np.int64)
    matrix[np.repeat(np.arange(len(lengths)), lengths), np.arange(len(ids)) - np.repeat(starts, lengths)] = ids
    a_ids = matrix[:num_hyp][owner]
    b_ids = np.where(matrix[num_hyp:] >= 0, matrix[num_hyp:], -2)
    lcs = np.zeros(len(owner), dtype=np.int64)
    fast = ref_len <= 63
    lcs[fast] = _lcs_bit_parallel(a_ids[fast, :max(int(hyp_len.max()), 1)],
                                  b_ids[fast, :min(width, 63)], ref_len[fast])
    for pair in np.nonzero(~fast)[0]:
        lcs[pair] = _lcs_python(list(a_ids[pair, :hyp_len[pair]]), list(b_ids[pair, :ref_len[pair]]))

    lcs = lcs.astype(np.float64)
    precision = np.full(num_hyp, -np.inf)
    recall = np.full(num_hyp, -np.inf)
    np.maximum.at(precision, owner, lcs / hyp_len)
    np.maximum.at(recall, owner, lcs / ref_len)
    # the reference's per-image formula, elementwise: the same float64 operations in the same
    # order as Python floats (numpy does not fuse them), so the same bits
    with np.errstate(invalid="ignore", divide="ignore"):
        f_score = ((1 + _BETA ** 2) * precision * recall) / (recall + _BETA ** 2 * precision)
    scores = np.where((precision != 0) & (recall != 0), f_score, 0.0)
    return float(np.mean(scores)), scores.tolist()
