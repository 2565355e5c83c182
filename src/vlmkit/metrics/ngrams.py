"""N-gram counts of many sentences at once, as integer arrays (shared by BLEU and CIDEr-D).

The reference scorers build one Python dict of tuple n-grams per sentence and loop over them
per (hypothesis, reference) pair; that is where their time goes. Here every token becomes an
integer, every n-gram of order k an integer id (the (k-1)-gram id times the vocabulary size
plus the last word, renumbered densely so ids never overflow), and per-sentence counts come
from sorting (order, sentence, n-gram) keys.

Sorting is what costs here, so the keys are laid out *order-major*: within one order the
occurrences already come sentence by sentence, only the few n-grams of each sentence are out of
order, and numpy's stable sort (timsort) finishes such nearly sorted data in a fraction of the
time of a general sort. The same layout, with images in place of sentences, serves BLEU's
clipping and CIDEr's document frequencies (`NgramCounts.keys`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count as naturals, repeat

import numpy as np

# Dense renumbering through a bitmap while the code range stays this small; above it, sort.
_BITMAP_LIMIT = 1 << 24
_INT32_LIMIT = np.iinfo(np.int32).max  # indices, ids and codes below it are 32-bit
# `encode_both` splits this many sentences at a time
_ENCODE_BLOCK = 1024
# `_split_encoding` replaces irregular occurrences one by one while there are fewer than this
# fraction of all (1 in N); otherwise it expands every occurrence with numpy.
_FEW_IRREGULAR = 256


@dataclass
class NgramCounts:
    """Distinct (sentence, n-gram) pairs with their counts, sorted by `key` (order-major).

    `gram` ids of order k lie in [gram_offset[k], gram_offset[k] + order_size[k]).
    `key_slots` is 0 when `key` is `keys(sentence)` (`count_ngrams_encoded`); for caption
    counts (`count_caption_ngrams`) it is the number of sentence slots per image and `key` is
    the image-layout key of `_count_and_join`, (order, image, gram, slot).
    """

    sentence: np.ndarray     # (P,) sentence index
    gram: np.ndarray         # (P,) n-gram id, unique across orders
    order: np.ndarray        # (P,) n-gram order minus one (0..n-1)
    count: np.ndarray        # (P,) occurrences of the n-gram in the sentence
    key: np.ndarray          # (P,) self.keys(sentence) or the image-layout key, ascending
    num_grams: int           # distinct n-grams of all orders
    lengths: np.ndarray      # (S,) number of words per sentence
    gram_offset: np.ndarray  # (n,) first id of each order
    order_size: np.ndarray   # (n,) distinct n-grams of each order
    key_slots: int = 0       # 0: sentence layout; else slots per image of the image layout

    def keys(self, group: np.ndarray, num_groups: int | None = None, gram: np.ndarray | None = None,
             order: np.ndarray | None = None) -> np.ndarray:
        """Integer key of (order, group, n-gram), increasing in that order, one per entry.

        `group` is a sentence index by default, or e.g. the image of each row (`num_groups`
        images); `gram`/`order` default to this table's rows.
        """
        gram = self.gram if gram is None else gram
        order = self.order if order is None else order
        num_groups = len(self.lengths) if num_groups is None else num_groups
        offset = self.gram_offset[order]
        return (num_groups - 1) * offset + group * self.order_size[order] + gram


def encode_words(sentences: list[str], separator: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer ids of the words of every sentence (flat) and the word count of each sentence.

    `separator=None` splits like `str.split()`, `" "` like `str.split(" ")`.
    """
    return encode_both(sentences)[0 if separator == " " else 1]


def encode_both(sentences: list[str]) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`encode_words` with `" "` and with `None`, sharing the work.

    Everything runs in C: joining with spaces and splitting on spaces gives every sentence's
    `split(" ")` words, a block of sentences at a time; `dict.setdefault` and `map` build the
    ids. Tokenized captions are single-space separated, so `split()` gives the same words unless
    a word is empty (an empty sentence) or holds other whitespace (a non-breaking space from
    PTB); only then is the `split()` encoding derived, with numpy, from the per-word `split()`
    of the few distinct words (`_split_encoding`).
    """
    lengths = np.fromiter(map(str.count, sentences, repeat(" ")), dtype=np.int64, count=len(sentences)) + 1
    # One dict pass: `setdefault` gives each word the position of its first occurrence; the
    # ids are those positions ranked (first occurrences in text order, as numbering the
    # distinct words in order of appearance gives), which numpy does with one cumsum. A block
    # of sentences at a time: its word strings are freed before the next block is split, so
    # they stay in cache instead of filling fresh memory (a fifth faster here).
    first: dict[str, int] = {}
    position = naturals()
    blocks = [np.fromiter(map(first.setdefault, " ".join(sentences[start:start + _ENCODE_BLOCK]).split(" "), position),
                          dtype=np.int64)
              for start in range(0, len(sentences), _ENCODE_BLOCK)]
    positions = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    del blocks
    is_first = np.zeros(len(positions), dtype=bool)
    is_first[positions] = True
    ids = (np.cumsum(is_first) - 1)[positions]
    vocab = {word: index for index, word in enumerate(first)}  # insertion order = first occurrence
    by_space = (ids, lengths)
    if all(len(word.split()) == 1 and word.split()[0] == word for word in vocab):
        return by_space, by_space
    return by_space, _split_encoding(vocab, ids, lengths)


def _split_encoding(vocab: dict[str, int], ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The `str.split()` encoding from the `split(" ")` one (`vocab` in first-occurrence order).

    Each space-separated word becomes its `split()` parts (none for an empty word, several
    across a non-breaking space). Numbering the parts while walking `vocab` in order gives
    every part the id of its first occurrence in the text, i.e. exactly the ids that encoding
    the `split()` words directly gives.
    """
    part_vocab: dict[str, int] = {}
    parts_of_word: list[list[int]] = []
    for word in vocab:  # insertion order = first occurrence
        parts_of_word.append([part_vocab.setdefault(part, len(part_vocab)) for part in word.split()])
    num_parts = np.fromiter(map(len, parts_of_word), dtype=np.int64, count=len(parts_of_word))
    flat_parts = np.fromiter((p for parts in parts_of_word for p in parts), dtype=np.int64,
                             count=int(num_parts.sum()))
    first_part = np.cumsum(num_parts) - num_parts
    count = num_parts[ids]  # parts of each word occurrence
    irregular = np.flatnonzero(count != 1)
    if len(irregular) * _FEW_IRREGULAR < len(ids):
        # Usual case, a few words with a non-breaking space: every other occurrence is its one
        # part; each irregular one is replaced by its parts (none or several) in place, which
        # is what the general expansion below gives.
        one_part = flat_parts[np.minimum(first_part, max(len(flat_parts) - 1, 0))] if len(flat_parts) else first_part
        pieces, stop = [], 0
        split_ids = one_part[ids]
        for position, word in zip(irregular.tolist(), ids[irregular].tolist()):
            pieces.append(split_ids[stop:position])
            pieces.append(flat_parts[first_part[word]:first_part[word] + num_parts[word]])
            stop = position + 1
        pieces.append(split_ids[stop:])
        split_ids = np.concatenate(pieces)
        split_lengths = lengths.copy()
        sentence_end = np.cumsum(lengths)
        np.add.at(split_lengths, np.searchsorted(sentence_end, irregular, side="right"), count[irregular] - 1)
        return split_ids, split_lengths
    start = np.repeat(first_part[ids], count)
    within = np.arange(len(start)) - np.repeat(np.cumsum(count) - count, count)
    split_ids = flat_parts[start + within]
    sentence = np.repeat(np.arange(len(lengths)), lengths)
    split_lengths = np.bincount(sentence, weights=count, minlength=len(lengths)).astype(np.int64)
    return split_ids, split_lengths

def reference_images(references: list[list[str]], num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """For the references of `num_images` images, grouped by image: the number of references of
    each image (I,) and the image of every reference, in order (R,). (numpy raises when there
    are not `num_images` groups.)"""
    per_image = np.fromiter(map(len, references), dtype=np.int64, count=len(references))
    return per_image, np.repeat(np.arange(num_images, dtype=np.int64), per_image)


def count_caption_ngrams(hypotheses: list[str], references: list[list[str]], n: int = 4,
                         encoded: tuple[np.ndarray, np.ndarray] | None = None) -> NgramCounts:
    """N-gram counts of the hypotheses (sentences 0..H-1) then all references, image by image.

    Sentences are split with `str.split()` like pycocoevalcap's BLEU and CIDEr scorers;
    `encoded` is that split already done (`encode_both(...)[1]`). The rows come in image layout
    and the hypothesis/reference join is computed with them (`_count_and_join`).
    """
    if encoded is None:
        sentences = list(hypotheses)
        for refs in references:
            sentences.extend(refs)
        encoded = encode_words(sentences)
    return _count_and_join(*encoded, len(hypotheses), *reference_images(references, len(hypotheses)), n)


def _renumber(codes: np.ndarray, bound: int) -> tuple[np.ndarray, int]:
    """Dense ids (0..m-1, in increasing code order) of integer codes in [0, bound), and m.

    The ids are 32-bit unless there are 2**31 codes or more (an id is below the number of codes).
    """
    id_dtype = np.int32 if len(codes) < _INT32_LIMIT else np.int64
    if len(codes) == 0:
        return codes.astype(id_dtype), 0
    if bound <= _BITMAP_LIMIT:
        # No sort: mark the codes present in a bitmap; a code's id is the number of present
        # codes below it, i.e. the set bits in the words before its word plus those below its
        # bit. A bitmap of the 4-gram codes (millions) fits in cache, where an id table of that
        # size would be touched at scattered pages (each first touch a page fault).
        present = np.zeros(-(-bound // 64) * 64, dtype=bool)
        present[codes] = True
        words = np.packbits(present, bitorder="little").view(np.uint64)  # bit b of word w: code 64 w + b
        del present
        set_bits = np.bitwise_count(words)
        before = np.cumsum(set_bits, dtype=np.int64)
        num_distinct = int(before[-1])
        if num_distinct == bound:  # every code present (e.g. word ids): the ids are the codes
            return codes.astype(id_dtype, copy=False), bound
        before -= set_bits
        word = codes >> 6
        below = (np.uint64(1) << (codes & 63).astype(np.uint64)) - np.uint64(1)
        below &= words[word]
        ids = before.astype(id_dtype)[word]
        ids += np.bitwise_count(below)
        return ids, num_distinct
    sort_index = np.argsort(codes)
    sorted_codes = codes[sort_index]
    new_group = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    ids = np.empty(len(codes), dtype=id_dtype)
    ids[sort_index] = np.cumsum(new_group) - 1
    return ids, int(new_group.sum())


def _gram_ids(tokens: np.ndarray, lengths: np.ndarray, n: int):
    """Per order k = 1..n: (first token index, dense k-gram id) of the k-grams inside a sentence,
    plus the sentence of every token, the sizes of the orders and their first ids.

    Arrays are 32-bit where their range allows (indices and ids below 2**31; codes while the
    code range is): every result is the same, with half the memory to fill and read.
    """
    num_sentences = len(lengths)
    index_dtype = np.int32 if max(len(tokens), num_sentences) < _INT32_LIMIT else np.int64
    sentence_of_token = np.repeat(np.arange(num_sentences, dtype=index_dtype), lengths)
    vocab_size = int(tokens.max()) + 1 if len(tokens) else 1
    word_ids = tokens.astype(np.int32 if vocab_size < _INT32_LIMIT else np.int64)

    positions, local_parts, sizes = [], [], []
    previous, previous_size = word_ids, vocab_size
    for k in range(1, n + 1):
        if k == 1:
            ids, size = _renumber(word_ids, vocab_size)
        else:
            # the k-gram starting at i is the (k-1)-gram at i followed by token i+k-1
            bound = previous_size * vocab_size
            code_dtype = np.int32 if bound < _INT32_LIMIT else np.int64
            combined = previous[:len(word_ids) - k + 1].astype(code_dtype)
            combined *= vocab_size
            combined += word_ids[k - 1:]
            ids, size = _renumber(combined, bound)
            del combined
        valid = sentence_of_token[:len(ids)] == sentence_of_token[k - 1:k - 1 + len(ids)]  # within a sentence
        positions.append(np.flatnonzero(valid).astype(index_dtype, copy=False))
        local_parts.append(ids[positions[-1]])
        sizes.append(max(size, 1))
        previous, previous_size = ids, max(size, 1)

    order_size = np.asarray(sizes, dtype=np.int64)
    gram_offset = np.concatenate([[0], np.cumsum(order_size)[:-1]]).astype(np.int64)
    return sentence_of_token, positions, local_parts, order_size, gram_offset


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values starts in `values` (sorted, or grouped)."""
    starts = np.empty(len(values), dtype=bool)
    starts[:1] = True
    np.not_equal(values[1:], values[:-1], out=starts[1:])
    return np.flatnonzero(starts)


def _unique_counts(key: np.ndarray, count_dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted key and how often each occurs."""
    starts = _run_starts(key)
    return key[starts], np.diff(starts, append=len(key)).astype(count_dtype, copy=False)


def count_ngrams_encoded(tokens: np.ndarray, lengths: np.ndarray, n: int = 4) -> NgramCounts:
    """Count the 1..n-grams of sentences given as flat word ids and per-sentence lengths."""
    num_sentences = len(lengths)
    sentence_of_token, positions, local_parts, order_size, gram_offset = _gram_ids(tokens, lengths, n)
    # order-major keys: order k occupies [S * offset_k, S * (offset_k + size_k)), sentence-major
    # inside, so each order's block is already sorted up to the n-grams within a sentence
    key = np.concatenate([gram_offset[k] * num_sentences + sentence_of_token[positions[k]] * order_size[k]
                          + local_parts[k] for k in range(n)]) if n else np.zeros(0, np.int64)
    unique_key, count = _unique_counts(np.sort(key, kind="stable"))
    counts = NgramCounts(sentence=unique_key, gram=unique_key, order=unique_key, count=count, key=unique_key,
                         num_grams=int(order_size.sum()), lengths=lengths, gram_offset=gram_offset,
                         order_size=order_size)
    # Decode (order, sentence, gram) block by block: the keys stay order-major after sorting,
    # so each order is one slice and its divisions are by a scalar (the inverse of `keys` with sentences as groups).
    counts.order, counts.sentence, counts.gram = _decode_blocks(unique_key, gram_offset * num_sentences,
                                                                gram_offset, order_size)
    return counts


def _decode_blocks(key: np.ndarray, block_start: np.ndarray, gram_offset: np.ndarray, order_size: np.ndarray):
    """(order, group, gram) of ascending keys `block_start[k] + group * order_size[k] + local gram`."""
    n = len(order_size)
    bounds = np.r_[np.searchsorted(key, block_start), len(key)]
    order = np.empty(len(key), dtype=key.dtype)
    group = np.empty(len(key), dtype=key.dtype)
    gram = np.empty(len(key), dtype=key.dtype)
    for k in range(n):
        a, b = bounds[k], bounds[k + 1]
        within = key[a:b] - block_start[k]
        order[a:b] = k
        np.floor_divide(within, order_size[k], out=group[a:b])
        gram[a:b] = within - group[a:b] * order_size[k] + gram_offset[k]
    return order, group, gram


# Above this key range the image layout would overflow int64: count by sentence, join apart.
_IMAGE_KEY_LIMIT = 1 << 62
_INT32_KEY_LIMIT = np.iinfo(np.int32).max  # below it, 32-bit keys


def _count_and_join(tokens: np.ndarray, lengths: np.ndarray, num_hyp: int, refs_per_image: np.ndarray,
                    ref_image: np.ndarray, n: int = 4) -> NgramCounts:
    """`count_ngrams_encoded` and `reference_join` of hypotheses then references from one sort.

    Every n-gram occurrence gets the key ((order, image, gram), slot), the slot being 0 for the
    image's hypothesis and 1 + j for its reference j, i.e. `reference_join`'s key times the
    number of slots plus the slot. Sorting these keys once gives both results:

    - equal keys are the occurrences of one n-gram in one sentence (a slot is one sentence), so
      the distinct keys and their multiplicities are exactly the (sentence, n-gram) counts;
    - rows with the same key divided by the number of slots form `reference_join`'s groups,
      already sorted by that key with the hypothesis row (slot 0) first, which is what its
      stable sort of (hypothesis rows, then reference rows) gives.

    The rows are therefore in (order, image, gram, slot) order instead of (order, sentence,
    gram). Every consumer sums per (sentence, order) (CIDEr-D's norms and dots, BLEU's clipped
    counts); a sentence lies in one image and one slot, so its rows still come in increasing
    gram order and every float sum is the same to the last bit. `key` holds the image-layout
    keys (`key_slots` is the number of slots); when their range fits 32 bits, `key`,
    `sentence`, `gram` and `order` are int32 (every product the scorers form from them, such
    as sentence * n + order, is below that range too).
    """
    num_sentences = len(lengths)
    slots = int(refs_per_image.max(initial=0)) + 1
    sentence_of_token, positions, local_parts, order_size, gram_offset = _gram_ids(tokens, lengths, n)
    key_range = int(order_size.sum()) * max(num_hyp, 1) * slots
    if n == 0 or key_range >= _IMAGE_KEY_LIMIT:
        counts = count_ngrams_encoded(tokens, lengths, n)
        reference_join(counts, ref_image, num_hyp)
        return counts
    # 32-bit keys and row fields when the keys fit (every key, sentence * n + order and
    # order * images + image is below the key range): half the memory traffic, faster division
    dtype = np.int32 if key_range < _INT32_KEY_LIMIT else np.int64
    size, offset = order_size.astype(dtype), gram_offset.astype(dtype)
    # (image, slot) of every sentence as image * slots + slot
    ref_first = np.cumsum(refs_per_image) - refs_per_image
    ref_slot = np.arange(num_sentences - num_hyp) - ref_first[ref_image] + 1
    place = np.concatenate([np.arange(num_hyp, dtype=np.int64) * slots, ref_image * slots + ref_slot])
    place_of_token = place.astype(dtype)[sentence_of_token]
    del sentence_of_token  # (arrays are dropped as soon as they are used up: less memory to fill)
    keys = []
    for k in range(n):
        slot = place_of_token[positions[k]]
        image = slot // slots
        slot -= image * slots
        image *= size[k]
        # ((offset_k * H + image * size_k + gram) * slots + slot
        key = local_parts[k].astype(dtype)
        key += offset[k] * num_hyp
        key += image
        key *= slots
        key += slot
        keys.append(key)
        positions[k] = local_parts[k] = None
    del place_of_token, slot, image
    order_bounds = np.cumsum([0] + [len(k) for k in keys])
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=dtype)
    del keys
    _sort_order_blocks(key, order_bounds)
    key, count = _unique_counts(key, dtype)  # (count: occurrences of each distinct key)

    group_key = key // slots
    slot = key - group_key * slots
    order, image, gram = _decode_blocks(group_key, offset * num_hyp, offset, size)
    is_hyp = slot == 0
    sentence_of_place = np.full(num_hyp * slots, -1, dtype=dtype)
    sentence_of_place[place[:num_hyp]] = np.arange(num_hyp)
    sentence_of_place[place[num_hyp:]] = np.arange(num_hyp, num_sentences)
    image *= slots
    image += slot
    sentence = sentence_of_place[image]
    del image, slot, sentence_of_place
    counts = NgramCounts(sentence=sentence, gram=gram, order=order, count=count, key=key,
                         num_grams=int(order_size.sum()), lengths=lengths, gram_offset=gram_offset,
                         order_size=order_size, key_slots=slots)

    if len(key) == 0:
        empty = np.zeros(0, dtype=np.int64)
        counts._reference_join = (num_hyp, ref_image, ReferenceJoin(empty, empty, empty, empty, empty))
        return counts
    group_start = _run_starts(group_key).astype(dtype)  # (rows < key range)
    group_last = np.empty_like(group_start)
    group_last[:-1] = group_start[1:]
    group_last[-1] = len(key)
    group_last -= 1
    # a hypothesis row is always the first of its group (slot 0; one row per sentence and key),
    # so the hypothesis rows, in row order, are the starts of the groups led by one
    # (row selections below go through flatnonzero and take: boolean-mask indexing is slower)
    led_by_hyp = is_hyp[group_start]
    # a group holds a reference unless it is a lone hypothesis row
    holds_ref = ~is_hyp[group_last]
    # largest reference count per group, 0 without one: a count is at least 1, so it is 1 for
    # every group with a reference but those holding a reference row counted more than once
    # (few), which take the largest of those counts
    group_max = holds_ref.astype(count.dtype)
    repeated = np.flatnonzero((count > 1) & ~is_hyp)
    np.maximum.at(group_max, np.searchsorted(group_start, repeated, side="right") - 1, count[repeated])
    has_ref = np.flatnonzero(holds_ref)
    del holds_ref, repeated
    with_ref = group_start[has_ref]
    join_key, join_gram, max_count = group_key[with_ref], gram[with_ref], group_max[has_ref]
    del with_ref, has_ref, group_key
    hyp_clip = group_max[np.flatnonzero(led_by_hyp)]
    del group_max
    # every row takes its group's hypothesis row (the group's first row), -1 without one
    group_last -= group_start
    group_last += 1  # rows in the group
    group_start[~led_by_hyp] = -1
    row_match = np.repeat(group_start, group_last)
    join = ReferenceJoin(key=join_key, max_count=max_count, gram=join_gram, hyp_clip=hyp_clip, row_match=row_match)
    counts._reference_join = (num_hyp, ref_image, join)
    return counts


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


CORES = _available_cores()
_PARALLEL_SORT_MIN = 1 << 17  # keys; below it one thread sorts


def _sort_order_blocks(key: np.ndarray, bounds: np.ndarray) -> None:
    """Sort order-major keys in place; `bounds` are the order blocks' edges.

    Every key of an order is below every key of the next, so sorting the blocks on their own
    sorts the whole. With a second core, the blocks before and after the edge nearest to the
    middle are sorted side by side (numpy's sort releases the GIL).
    """
    edge = int(bounds[np.argmin(np.abs(bounds - len(key) // 2))])
    if CORES < 2 or len(key) < _PARALLEL_SORT_MIN or edge in (0, len(key)):
        key.sort(kind="stable")
        return
    with ThreadPoolExecutor(max_workers=1) as helper:
        upper = helper.submit(key[edge:].sort, kind="stable")
        key[:edge].sort(kind="stable")
        upper.result()


@dataclass
class ReferenceJoin:
    """Hypothesis n-grams joined with the same (order, image, gram) in the image's references.

    `key`, `max_count`, `gram`: per distinct (order, image, gram) of the references, its key
    (as `NgramCounts.keys` with num_hyp groups), its largest count in any one reference of the
    image and its gram id, sorted by key. `hyp_clip`: for each hypothesis row of the counts (in
    row order), that largest count for its gram and image, 0 when no reference has it.
    `row_match`: for each row of the counts, the row of its image's hypothesis with the same
    gram (a hypothesis row: itself), -1 when the hypothesis lacks it.
    """

    key: np.ndarray
    max_count: np.ndarray
    gram: np.ndarray
    hyp_clip: np.ndarray
    row_match: np.ndarray


def reference_join(counts: NgramCounts, ref_image: np.ndarray, num_hyp: int) -> ReferenceJoin:
    """The join BLEU (clipping), CIDEr-D (document frequency and the hypothesis weight seen by
    each reference gram) need, from one stable sort; computed once per `counts` and `ref_image`.

    `counts` holds the hypotheses (sentences 0..num_hyp-1) then the references, and
    `ref_image[j]` is the image of reference j. Hypothesis and reference rows get (order, image,
    gram) keys and are sorted together, hypothesis rows first: equal keys then form one group,
    led by the hypothesis row when there is one, so both directions of the look-up are read off
    the groups instead of binary-searching one side in the other (the searches were most of
    BLEU's and CIDEr-D's time). The keys are nearly sorted already (timsort is fast on runs).
    """
    cached = getattr(counts, "_reference_join", None)
    if cached is not None and cached[0] == num_hyp and np.array_equal(cached[1], ref_image):
        return cached[2]
    is_ref = counts.sentence >= num_hyp
    hyp_rows, ref_rows = np.flatnonzero(~is_ref), np.flatnonzero(is_ref)
    num_hyp_rows = len(hyp_rows)
    rows = np.concatenate([hyp_rows, ref_rows])
    # a hypothesis's sentence index is its image index
    image = np.concatenate([counts.sentence[hyp_rows], ref_image[counts.sentence[ref_rows] - num_hyp]])
    key = counts.keys(image, num_hyp, gram=counts.gram[rows], order=counts.order[rows])
    if len(key) == 0:
        empty = np.zeros(0, dtype=np.int64)
        join = ReferenceJoin(empty, empty, empty, empty, empty)
        counts._reference_join = (num_hyp, ref_image, join)
        return join
    by_key = np.argsort(key, kind="stable")  # stable: the hypothesis row leads its group
    sorted_key = key[by_key]
    new_group = np.empty(len(key), dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=new_group[1:])
    group_start = np.flatnonzero(new_group)
    from_ref = by_key >= num_hyp_rows
    # largest reference count per group (hypothesis rows count 0; a count is at least 1)
    entry_count = np.concatenate([np.zeros(num_hyp_rows, dtype=counts.count.dtype), counts.count[ref_rows]])
    group_max = np.maximum.reduceat(entry_count[by_key], group_start)
    group_of = np.empty(len(key), dtype=np.int64)  # group of each (hypothesis, reference) entry
    group_of[by_key] = np.cumsum(new_group) - 1
    first = by_key[group_start]
    group_hyp_row = np.full(len(group_start), -1, dtype=np.int64)
    led_by_hyp = first < num_hyp_rows
    group_hyp_row[led_by_hyp] = hyp_rows[first[led_by_hyp]]
    # a group holds a reference unless it is a lone hypothesis row (hypothesis keys are unique)
    group_end = np.r_[group_start[1:], len(key)]
    has_ref = from_ref[group_end - 1]
    row_match = np.empty(len(key), dtype=np.int64)
    row_match[rows] = group_hyp_row[group_of]  # (a hypothesis row leads its group: itself)
    join = ReferenceJoin(key=sorted_key[group_start][has_ref], max_count=group_max[has_ref],
                         gram=counts.gram[rows[first]][has_ref], hyp_clip=group_max[group_of[:num_hyp_rows]],
                         row_match=row_match)
    counts._reference_join = (num_hyp, ref_image, join)
    return join
