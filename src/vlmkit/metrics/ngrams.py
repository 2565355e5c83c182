"""N-gram counts of many sentences at once, as integer arrays (shared by BLEU and CIDEr-D).

The reference scorers build one Python dict of tuple n-grams per sentence and loop over them
per (hypothesis, reference) pair; that is where their time goes. Here every token becomes an
integer, every n-gram an integer id (built order by order with `np.unique`, so ids never
overflow), and per-sentence counts come from one sort of (sentence, n-gram) keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NgramCounts:
    """Distinct (sentence, n-gram) pairs with their counts, sorted by key = sentence * size + gram."""

    sentence: np.ndarray  # (P,) sentence index
    gram: np.ndarray      # (P,) n-gram id, unique across orders
    order: np.ndarray     # (P,) n-gram order minus one (0..n-1)
    count: np.ndarray     # (P,) occurrences of the n-gram in the sentence
    key: np.ndarray       # (P,) sentence * num_grams + gram, ascending
    num_grams: int
    lengths: np.ndarray   # (S,) number of words per sentence


def encode_words(sentences: list[str], separator: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer ids of the words of every sentence (flat) and the word count of each sentence.

    `separator=None` splits like `str.split()`, `" "` like `str.split(" ")`. The loops run in C
    (`map`, `dict.fromkeys`), which is what makes this several times faster than a Python loop.
    """
    split = str.split if separator is None else (lambda text: text.split(separator))
    token_lists = list(map(split, sentences))
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    words = [word for tokens in token_lists for word in tokens]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.int64, count=len(words))
    return ids, lengths


def count_caption_ngrams(hypotheses: list[str], references: list[list[str]], n: int = 4) -> NgramCounts:
    """N-gram counts of the hypotheses (sentences 0..H-1) then all references, image by image.

    Sentences are split with `str.split()` like pycocoevalcap's BLEU and CIDEr scorers.
    """
    sentences = list(hypotheses)
    for refs in references:
        sentences.extend(refs)
    return count_ngrams_encoded(*encode_words(sentences), n)


def count_ngrams(sentences: list[list[str]], n: int = 4) -> NgramCounts:
    """Count the 1..n-grams of every sentence (a list of words)."""
    vocab: dict[str, int] = {}
    token_ids = [vocab.setdefault(word, len(vocab)) for words in sentences for word in words]
    lengths = np.fromiter((len(words) for words in sentences), dtype=np.int64, count=len(sentences))
    return count_ngrams_encoded(np.asarray(token_ids, dtype=np.int64), lengths, n)


def count_ngrams_encoded(tokens: np.ndarray, lengths: np.ndarray, n: int = 4) -> NgramCounts:
    """Count the 1..n-grams of sentences given as flat word ids and per-sentence lengths."""
    sentence_of_token = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    vocab_size = int(tokens.max()) + 1 if len(tokens) else 1

    sentence_parts, gram_parts, order_parts = [], [], []
    offset = 0
    previous = tokens
    for k in range(1, n + 1):
        if k == 1:
            ids = tokens
        else:
            # the k-gram starting at i is the (k-1)-gram at i followed by token i+k-1; re-index
            # with np.unique so ids stay small whatever n and the vocabulary size
            combined = previous[:len(tokens) - k + 1] * vocab_size + tokens[k - 1:]
            sort_index = np.argsort(combined)
            sorted_combined = combined[sort_index]
            new_group = np.r_[True, sorted_combined[1:] != sorted_combined[:-1]]
            ids = np.empty(len(combined), dtype=np.int64)
            ids[sort_index] = np.cumsum(new_group) - 1
        starts = sentence_of_token[:len(ids)]
        valid = starts == sentence_of_token[k - 1:k - 1 + len(ids)]  # does not cross a sentence end
        sentence_parts.append(starts[valid])
        gram_parts.append(ids[valid] + offset)
        order_parts.append(np.full(int(valid.sum()), k - 1, dtype=np.int64))
        offset += int(ids.max()) + 1 if len(ids) else 0
        previous = ids

    sentence = np.concatenate(sentence_parts) if sentence_parts else np.zeros(0, np.int64)
    gram = np.concatenate(gram_parts) if gram_parts else np.zeros(0, np.int64)
    order = np.concatenate(order_parts) if order_parts else np.zeros(0, np.int64)
    num_grams = max(offset, 1)
    key = sentence * num_grams + gram
    sort_index = np.argsort(key)
    sorted_key = key[sort_index]
    starts = np.nonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])[0] if len(key) else np.zeros(0, np.int64)
    unique_key = sorted_key[starts]
    first = sort_index[starts]
    count = np.diff(np.r_[starts, len(key)])
    return NgramCounts(sentence=sentence[first], gram=gram[first], order=order[first], count=count,
                       key=unique_key, num_grams=num_grams, lengths=lengths)


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort-based; numpy 2's hash-based `np.unique` is slower here)."""
    values = np.sort(values)
    if len(values) == 0:
        return values
    return values[np.r_[True, values[1:] != values[:-1]]]


def lookup(counts: NgramCounts, sentence: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Count of each (sentence, gram) query in `counts` (0 where absent)."""
    query = sentence * counts.num_grams + gram
    position = np.searchsorted(counts.key, query)
    position = np.minimum(position, len(counts.key) - 1)
    found = counts.key[position] == query if len(counts.key) else np.zeros(len(query), bool)
    return np.where(found, counts.count[position] if len(counts.key) else 0, 0)
