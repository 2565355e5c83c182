"""BLEU-1..4 exactly as pycocoevalcap computes it (`Bleu(4)`, option "closest").

Per sentence: n-gram counts clipped by the largest count in any one reference; reference length
is the closest reference length (ties go to the shorter); brevity penalty exp(1 - r/c) when
c < r. Corpus BLEU sums the clipped counts, guesses and lengths over sentences first. The tiny
constants (1e-15 added to matches, 1e-9 to guesses and lengths) are kept so that an order
without any match gives a small positive score, as in the reference.
"""
from __future__ import annotations

import numpy as np

from vlmkit.metrics.ngrams import NgramCounts, count_caption_ngrams, reference_images, reference_join

_TINY = 1e-15
_SMALL = 1e-9


def bleu_scores(hypotheses: list[str], references: list[list[str]], n: int = 4,
                counts: NgramCounts | None = None) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-hypothesis BLEU-1..n (`per[k][i]`) for tokenized strings.

    Words are `str.split()` (any whitespace), as in the reference. `counts` may be passed in
    when already computed by `count_caption_ngrams` (CIDEr-D needs the same counts).
    """
    num_hyp = len(hypotheses)
    ref_counts, ref_image = reference_images(references, num_hyp)
    if counts is None:
        counts = count_caption_ngrams(hypotheses, references, n)
    lengths = counts.lengths
    hyp_len = lengths[:num_hyp]
    ref_len = lengths[num_hyp:]

    # Clip: for every hypothesis gram the largest count in any one reference of its image.
    is_ref = counts.sentence >= num_hyp
    hyp_rows = np.nonzero(~is_ref)[0]
    clip = reference_join(counts, ref_image, num_hyp).hyp_clip  # per hypothesis row, in row order
    matched = np.minimum(counts.count[hyp_rows], clip)
    correct = np.bincount(counts.order[hyp_rows] * num_hyp + counts.sentence[hyp_rows], weights=matched,
                          minlength=n * num_hyp).reshape(n, num_hyp).round().astype(np.int64)
    guess = np.maximum(0, hyp_len[None, :] - np.arange(n)[:, None])  # (n, num_hyp)

    # Closest reference length, ties to the shorter one: minimise (|r - c|, r).
    # Encoded as |r - c| * scale + r, so one minimum per image (references are contiguous).
    if num_hyp and ref_counts.min() > 0:
        scale = int(ref_len.max()) + 1
        encoded = np.abs(ref_len - hyp_len[ref_image]) * scale + ref_len
        closest = np.minimum.reduceat(encoded, np.cumsum(ref_counts) - ref_counts) % scale
    else:  # an image without references: as the reference, min() of nothing fails
        closest = np.empty(num_hyp, dtype=np.int64)
        start = 0
        for image, refs in enumerate(references):
            stop = start + len(refs)
            candidates = ref_len[start:stop]
            closest[image] = min((abs(int(r) - int(hyp_len[image])), int(r)) for r in candidates)[1]
            start = stop

    per_image = _combine(correct.astype(np.float64), guess.astype(np.float64),
                         hyp_len.astype(np.float64), closest.astype(np.float64), n)
    corpus = _combine(correct.sum(1, keepdims=True).astype(np.float64),
                      guess.sum(1, keepdims=True).astype(np.float64),
                      np.array([float(hyp_len.sum())]), np.array([float(closest.sum())]), n)
    return corpus[:, 0].tolist(), per_image.tolist()  # Python floats, as before


def _combine(correct: np.ndarray, guess: np.ndarray, test_len: np.ndarray, ref_len: np.ndarray,
             n: int) -> np.ndarray:
    """Geometric means of precisions with the brevity penalty, in the reference's operation order."""
    scores = np.empty_like(correct)
    running = np.ones(correct.shape[1])
    for k in range(n):
        running = running * ((correct[k] + _TINY) / (guess[k] + _SMALL))
        scores[k] = running ** (1.0 / (k + 1))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.where(ratio < 1, ratio, 1.0)), 1.0)
    return scores * penalty[None, :]
