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


def lcs_lengths(pairs_a: list[list[str]], pairs_b: list[list[str]]) -> np.ndarray:
    """LCS length of each pair (a[i], b[i]); vectorised when every b has at most 63 tokens."""
    count = len(pairs_a)
    result = np.zeros(count, dtype=np.int64)
    if count == 0:
        return result
    fast = [i for i in range(count) if len(pairs_b[i]) <= 63]
    slow = sorted(set(range(count)) - set(fast))
    for i in slow:
        result[i] = _lcs_python(pairs_a[i], pairs_b[i])
    if not fast:
        return result
    vocab: dict[str, int] = {}
    a_len = max(len(pairs_a[i]) for i in fast)
    b_len = max(len(pairs_b[i]) for i in fast)
    a_ids = np.full((len(fast), max(a_len, 1)), -1, dtype=np.int64)
    b_ids = np.full((len(fast), max(b_len, 1)), -2, dtype=np.int64)
    for row, i in enumerate(fast):
        a_ids[row, :len(pairs_a[i])] = [vocab.setdefault(t, len(vocab)) for t in pairs_a[i]]
        b_ids[row, :len(pairs_b[i])] = [vocab.setdefault(t, len(vocab)) for t in pairs_b[i]]
    b_lengths = np.array([len(pairs_b[i]) for i in fast], dtype=np.int64)
    result[fast] = _lcs_bit_parallel(a_ids, b_ids, b_lengths)
    return result


def _lcs_bit_parallel(a_ids: np.ndarray, b_ids: np.ndarray, b_lengths: np.ndarray) -> np.ndarray:
    """LCS lengths of padded id rows (a padding never equals b padding; b rows <= 63 words)."""
    if len(a_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    width = b_ids.shape[1]
    nbytes = next(size for size in (1, 2, 4, 8) if 8 * size >= width)
    if width < 8 * nbytes:  # pad b to a whole unsigned integer of bits; -3 never equals an a id
        b_ids = np.concatenate([b_ids, np.full((len(b_ids), 8 * nbytes - width), -3, b_ids.dtype)], axis=1)
    # The comparisons below read the whole b matrix once per word of a: with a small vocabulary
    # 16-bit ids move a quarter of the memory of 64-bit ones (same equalities; paddings fit).
    if max(int(a_ids.max(initial=0)), int(b_ids.max(initial=0))) < np.iinfo(np.int16).max:
        a_ids, b_ids = a_ids.astype(np.int16), b_ids.astype(np.int16)
    v = np.full(len(a_ids), np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for step in range(a_ids.shape[1]):
            # bitmask of the positions in b equal to the current word of a: bit j <- column j
            # (packbits in little bit order, read as a little-endian integer)
            equal = b_ids == a_ids[:, step:step + 1]
            match = np.packbits(equal, axis=1, bitorder="little").view(f"<u{nbytes}")[:, 0].astype(np.uint64)
            u = v & match
            v = (v + u) | (v - u)
    mask = (np.uint64(1) << b_lengths.astype(np.uint64)) - np.uint64(1)
    return _popcount(~v & mask)


def _popcount(values: np.ndarray) -> np.ndarray:
    bytes_view = values.astype("<u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(bytes_view, axis=1).sum(axis=1).astype(np.int64)


def rouge_l_scores(hypotheses: list[str], references: list[list[str]],
                   encoded: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, list[float]]:
    """Corpus ROUGE-L (mean of image scores) and per-image scores, for tokenized strings.

    `encoded` may hold the `split(" ")` word ids of hypotheses then references
    (`vlmkit.metrics.ngrams.encode_both(...)[0]`).
    """
    from vlmkit.metrics.ngrams import encode_words

    num_hyp = len(hypotheses)
    owner = np.repeat(np.arange(num_hyp, dtype=np.int64), [len(refs) for refs in references])
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
    scores = []
    for p, r in zip(precision.tolist(), recall.tolist()):
        if p != 0 and r != 0:
            scores.append(((1 + _BETA ** 2) * p * r) / float(r + _BETA ** 2 * p))
        else:
            scores.append(0.0)
    return float(np.mean(np.array(scores))), scores
