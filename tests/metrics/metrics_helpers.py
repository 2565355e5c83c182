"""Reference paths the metric tests compare the fast code with; nothing in vlmkit uses them.

- `tokenize_tokens`: PTB tokenization caption by caption (the plain-caption test, else the
  scanner on the caption with the next one as context), which `ptb.tokenize` computes in bulk.
- `non_plain_lines`: `ptb._non_plain_lines` for a list of captions.
- `lcs_lengths`: LCS lengths of word-list pairs through the bit-parallel ROUGE-L kernel.
- `lookup`: a (sentence, n-gram) count read back from `ngrams.NgramCounts`.
- `abbreviation_words`: words the lexer's abbreviation rules know, to test final periods with.
"""
from __future__ import annotations

import re

import numpy as np

from vlmkit.metrics import ptb
from vlmkit.metrics.ngrams import NgramCounts
from vlmkit.metrics.rouge import _lcs_bit_parallel, _lcs_python


def tokenize_tokens(captions: list[str]) -> list[list[str]]:
    """PTB tokens of each caption (lowercased, punctuation dropped), as pycocoevalcap gets them.

    `captions` must be in the order pycocoevalcap feeds them to Java (image by image, each
    image's captions in order), because a caption's last token can depend on the next caption.
    """
    cleaned = [ptb._LINE_BREAKS.sub(" ", caption) for caption in captions]
    result: list[list[str]] = []
    for index, caption in enumerate(cleaned):
        if ptb._is_plain(caption):
            words = caption.replace(",", " ").replace(".", " ").lower().split()
            result.append(words)
            continue
        following = "\n" + cleaned[index + 1] if index + 1 < len(cleaned) else ""
        tokens = ptb._scan(caption + following, 0, len(caption))
        result.append([t for t in (tok.lower() for tok in tokens) if t not in ptb.PUNCTUATION])
    return result


def non_plain_lines(captions: list[str]) -> list[int]:
    """Indices of the captions `ptb._is_plain` rejects (captions without line breaks), by the
    bulk test `ptb.tokenize` uses."""
    data = ptb._ascii_lines("\n".join(captions))
    return ptb._non_plain_lines(data, data.lower(), len(captions))


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


def lookup(counts: NgramCounts, sentence: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Count of each (sentence, gram) query in `counts` (0 where absent)."""
    order = np.searchsorted(counts.gram_offset, gram, side="right") - 1
    query = counts.keys(sentence, gram=gram, order=order)
    row_key, row_count = counts.key, counts.count
    if counts.key_slots:  # image layout: sort the rows by their sentence keys first
        row_key = counts.keys(counts.sentence)
        by_key = np.argsort(row_key)
        row_key, row_count = row_key[by_key], row_count[by_key]
    position = np.searchsorted(row_key, query)
    position = np.minimum(position, len(row_key) - 1)
    found = row_key[position] == query if len(row_key) else np.zeros(len(query), bool)
    return np.where(found, row_count[position] if len(row_key) else 0, 0)


def abbreviation_words() -> frozenset:
    """Lower-cased words that some abbreviation rule could join with a following period."""
    words = set()
    for source in (ptb.ABMONTH, ptb.ABDAYS, ptb.ABSTATE, ptb.ABCOMP, ptb.ABNUM, ptb.ABTITLE,
                   "etc|al|seq|ca|fig|figs|prop|no|nos|art|bldg|pp|op|vs|Alex|Wm|Jos|Cie|cf|TREAS|Invt|Elec|"
                   "Natl|Mfg|Mtg|Jr|Sr|Bros|Blvd|Rd|Esq|Kan|Kans|Co|Cos|Pty|Ptys|Ppty|Pptys|Wis|Wisc|Dr|Drs|Prof|Profs|"
                   "Sen|Sens|Rep|Reps|Atty|Attys|Gov|Govs|St|Ste|Supt|Supts|Cmdr|Comdr|Sept|Tues|Thurs"):
        for word in source.split("|"):
            words.add(re.sub(r"[\[\]?]", "", word).lower())
    return frozenset(words)
