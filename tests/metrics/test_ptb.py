"""PTB tokenization parity with the Java PTBTokenizer that pycocoevalcap runs."""
from __future__ import annotations

import random

import pytest

from vlmkit.metrics.ptb import tokenize
from vlmkit.metrics.synthetic import _TRICKY, random_caption

from metrics_helpers import abbreviation_words, non_plain_lines, tokenize_tokens


def test_parity_with_java_on_6000_varied_captions(java_ptb):
    rng = random.Random(1234)
    captions = [random_caption(rng, tricky=0.7) for _ in range(6000)]
    expected = java_ptb(captions)
    ours = tokenize(captions)
    mismatches = [(c, e, o) for c, e, o in zip(captions, expected, ours) if e != o]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


def test_parity_on_every_tricky_fragment_in_several_contexts(java_ptb):
    captions = []
    for fragments in _TRICKY.values():
        for fragment in fragments:
            captions += [f"A {fragment} b.", f"x {fragment}", fragment, f"The {fragment}."]
    assert tokenize(captions) == java_ptb(captions)


@pytest.mark.parametrize("caption, expected", [
    ("A man's dog doesn't like it.", "a man 's dog does n't like it"),
    ("He said (maybe) [not] {ever}.", "he said -lrb- maybe -rrb- -lsb- not -rsb- -lcb- ever -rcb-"),
    ("A well-known 3-year-old x-ray.", "a well-known 3-year-old x-ray"),
    ("Prices: $5.99, \u00a33 and 50\u00a2.", "prices $ 5.99 # 3 and 50 cents"),
    ("Mix 1 1/2 cups.", "mix 1\u00a01/2 cups"),
    ("\u201cCurly\u201d \u2014 done\u2026", "curly done"),
    ("emoji \U0001f600 deleted", "emoji deleted"),
])
def test_known_tokenizations(caption, expected):
    assert tokenize([caption]) == [expected]


def test_final_abbreviation_depends_on_the_next_caption():
    # The Java tool sees all captions as one document: "B." before a sentence-like start loses
    # its period, before a lowercase word it keeps it (the period token itself is dropped).
    assert tokenize(["the letter B.", "The end"])[0] == "the letter b"
    assert tokenize(["the letter B.", "foo"])[0] == "the letter b."
    assert tokenize(["made by Acme Inc.", "Foo"])[0] == "made by acme inc."


def test_bulk_plain_detection_and_tokenize_match_the_per_caption_path():
    """`tokenize` (bulk plain-caption path) equals the per-caption `tokenize_tokens` path."""
    from vlmkit.metrics import ptb

    rng = random.Random(7)
    captions = [random_caption(rng, tricky=t, style=s) for t, s in [(0.7, "varied"), (0.1, "coco"), (0.9, "coco")]
                for _ in range(3000)]
    captions += ["a b.", "a b .", "x y  .", "A dog etc.", "A dog etc .", "cannot go", "I cannot.", "dog Mr.",
                 "dog Mrs .", "Ark.", "ark", "x\ny", "a\rb", "a, b, c.", "a ,b", "Cannot", "gonna be", "a gonnab.",
                 "Mass.", "mass.", "Ill.", "no.", "nos .", "figs.", "K.", "\u212a.", "a \u212aan.", "a, .", "a b,",
                 " a b", "a b ", "", "a..", "\U0001f600 x.", "plan B.", "the end"]
    cleaned = [ptb._LINE_BREAKS.sub(" ", c) for c in captions]
    expected_non_plain = [i for i, c in enumerate(cleaned) if not ptb._is_plain(c)]
    assert non_plain_lines(cleaned) == expected_non_plain
    assert tokenize(captions) == [" ".join(tokens) for tokens in tokenize_tokens(captions)]


def _fragment_captions(sgml: bool = True):
    """Every tricky fragment before/after lowercase words, capitals, digits, periods, "<", ..."""
    captions = []
    for fragments in _TRICKY.values():
        for fragment in fragments:
            captions += [f"a {fragment} b", f"A {fragment} The end.", f"x {fragment} 5 y", f"x {fragment} . y",
                         f"{fragment} (a) b", f"the {fragment}", f"no. {fragment} \u00e9t\u00e9 x",
                         f"{fragment}  two  spaces", f"U.S. {fragment} etc. also", f"dog {fragment} 1 1/2 x",
                         f"dog {fragment} U.S. The x", f"{fragment} x.", f"x {fragment}"]
            if sgml:
                captions.append(f"{fragment} <b> c")
    return captions


def test_segment_memo_equals_whole_caption_scanning():
    """`_scan_segmented` (each distinct segment scanned once, plain tails skipped) on one
    caption at a time equals scanning the whole caption, on the generated corpora and every
    tricky fragment in many contexts, with and without a memo shared across calls."""
    from vlmkit.metrics import ptb

    rng = random.Random(11)
    captions = [random_caption(rng, tricky=t, style=s) for t, s in [(0.7, "varied"), (0.1, "coco"), (0.9, "coco"),
                                                                     (0.9, "varied")] for _ in range(2500)]
    captions += _fragment_captions()
    captions += ["a \u00ad b", "x \u00ad", "\u00ad", "a , b", "etc. a", "Mr. a b.", "a b. c", "1 1/2 a", "x . . . y"]
    cleaned = [ptb._LINE_BREAKS.sub(" ", c) for c in captions]
    expected = [" ".join(tokens) for tokens in tokenize_tokens(captions)]
    shared: dict = {}
    for index, caption in enumerate(cleaned):
        if "<" in caption:  # scanned whole by `tokenize`
            continue
        assert ptb._scan_segmented(cleaned, [index], {}) == [expected[index]], caption
        assert ptb._scan_segmented(cleaned, [index], shared) == [expected[index]], caption
    assert tokenize(captions) == expected
    assert tokenize(captions, shared) == expected


def test_caption_tails_see_the_next_caption_exactly_as_whole_scanning(java_ptb):
    """A caption's last segment is scanned once and remembered unless it ends in a letter and a
    period (or is the last caption's): the same tails before next captions that could matter
    (capitals, acronym followers, digits, periods, quotes, spaces, "<"), as the per-caption
    path and the Java tokenizer see them (Java without the "<b>" follower: before a line
    starting with a tag, the scanner keeps the period of "the letter a." where Java drops it,
    as `test_segment_breaks_never_split_a_token` notes)."""
    from vlmkit.metrics import ptb

    followers = ["The end.", "a b", "U.S. The", "5 x", ". x", "  The x", "'s x", "etc. x", "A b", "It x", "<b> c"]
    for with_tag in (False, True):
        captions = []
        for fragments in _TRICKY.values():
            for fragment in fragments:
                for follower in followers[:len(followers) - (not with_tag)]:
                    captions += [f"x {fragment}", follower]
        captions.append(f"x {_TRICKY[next(iter(_TRICKY))][0]}")  # a tail with no caption after it
        expected = [" ".join(tokens) for tokens in tokenize_tokens(captions)]
        assert tokenize(captions) == expected
        if not with_tag:
            assert expected == java_ptb(captions)


def test_segment_break_pattern_is_the_documented_rule():
    """`_SEGMENT_BREAK` cuts exactly at a space followed by a character that is not a digit,
    ASCII capital, period, "<" or SPACENL start, or at a space after an ASCII letter followed
    by anything but "<" and a SPACENL start (never at the end); its character class holds
    exactly the characters SPACENL can start with."""
    import re

    from vlmkit.metrics import ptb

    chars = [chr(code) for code in range(0x3100) if not 0xD800 <= code <= 0xDFFF]
    assert ({c for c in chars if re.match(ptb.SPACENL, c + "\n")}
            == {c for c in chars if re.fullmatch(f"[{ptb._SPACENL_CHARS}]", c)})
    rng = random.Random(5)
    alphabet = "aZ1 .<\n\t\u00a0\u3000\u0663x,'\u2028\r-"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        expected = [i for i, c in enumerate(text) if c == " " and i + 1 < len(text) and (
            not re.match(f"[{ptb._D}A-Z.<]|{ptb.SPACENL}", text[i + 1:])
            or (i > 0 and text[i - 1].isascii() and text[i - 1].isalpha()
                and not re.match(f"<|{ptb.SPACENL}", text[i + 1:])))]
        assert [m.start() for m in ptb._SEGMENT_BREAK.finditer(text)] == expected, text


def test_segment_breaks_never_split_a_token(java_ptb):
    """The segment boundaries hold against the Java tokenizer itself, fragment by fragment.

    (Without the "<b>" contexts: captions holding "<" are scanned whole, and the scanner, before
    and after segmenting alike, keeps the period of "the letter a. <b> c" where Java drops it.)
    """
    captions = _fragment_captions(sgml=False)
    assert tokenize(captions) == java_ptb(captions)


def test_first_character_pruning_is_unchanged_by_the_class_cache():
    """The cached binary-search class test answers as the plain loop over the class members."""
    from vlmkit.metrics import ptb

    c = ptb._sre_constants
    chars = [chr(code) for code in range(0x20, 0x3000, 7) if not 0xD800 <= code <= 0xDFFF] + ["\U0001f600", "\u0130"]
    for pattern in (ptb.LETTER, ptb.DIGIT, ptb.MISCSYMBOL, "[^A-Za-z]", "(?i:[a-c\u00e9])", "(?i:[^xy])"):
        parsed = ptb._sre_parse.parse(pattern)
        op, members = parsed[0] if parsed[0][0] is c.IN else parsed[0][1][3][0]
        ignore_case = "(?i:" in pattern

        def loop(ch):  # the original member-by-member test
            candidates = {ch, ch.lower(), ch.upper()} if ignore_case else {ch}
            negate = any(m[0] is c.NEGATE for m in members)
            for cand in candidates:
                code = ord(cand) if len(cand) == 1 else -1
                hit = any((kind is c.LITERAL and code == value) or (kind is c.RANGE and value[0] <= code <= value[1])
                          or kind is c.CATEGORY for kind, value in members)
                if hit != negate:
                    return True
            return False

        test = ptb._first_char_test(pattern)
        assert [test(ch) for ch in chars] == [loop(ch) for ch in chars], pattern


def test_bulk_segmentation_equals_whole_caption_scanning():
    """`tokenize` cuts all non-plain captions into segments with one regex call
    (`_scan_segmented`); it must give what scanning each caption whole gives, including empty
    captions, leading and trailing spaces, captions made only of soft hyphens (an empty kept
    token), the boundary mark itself and "<", and with the last caption non-plain, with a
    memo shared across calls and on a subset of the captions."""
    from vlmkit.metrics import ptb

    rng = random.Random(12)
    captions = [random_caption(rng, tricky=t, style=s) for t, s in [(0.7, "varied"), (0.3, "coco")] for _ in range(1500)]
    captions += _fragment_captions()
    captions += ["", " a b", "a b ", " ", "\u00ad", "a \u00ad b", "x \u00ad", "a\x01b c", "\x01", "x \x01 y.", "a <b> c",
                 "A dog etc.", "", "Mr. X", "the letter B.", "The end", "plan B.", "", "x y.", "a cannot", "no. 5",
                 "a b. c", "x  .", "1 1/2 a", "U.S. The", "ends with B."]
    cleaned = [ptb._LINE_BREAKS.sub(" ", c) for c in captions]
    expected = [" ".join(tokens) for tokens in tokenize_tokens(captions)]
    bulk = [i for i in range(len(cleaned)) if "<" not in cleaned[i] and ptb._MARK not in cleaned[i]]
    shared: dict = {}
    assert ptb._scan_segmented(cleaned, bulk, {}) == [expected[i] for i in bulk]
    assert ptb._scan_segmented(cleaned, bulk, shared) == [expected[i] for i in bulk]
    assert ptb._scan_segmented(cleaned, bulk, shared) == [expected[i] for i in bulk]  # memo filled
    assert ptb._scan_segmented(cleaned, bulk[1::3], {}) == [expected[i] for i in bulk[1::3]]
    assert tokenize(captions) == expected


def test_plain_line_detection_equals_the_regex_on_random_text():
    """`_non_plain_lines` (the plain-caption conditions as masks over all lines at once) marks
    exactly the lines `_is_plain` rejects, on random text over every character class it
    tells apart (and empty lines, lines of one character, the ends of the text)."""
    from vlmkit.metrics import ptb

    rng = random.Random(3)
    for length in (1, 2, 3, 5, 50, 20000):
        for _ in range(20 if length < 100 else 3):
            lines = "".join(rng.choice("aZ ,.\n?-") for _ in range(length)).split("\n")
            assert non_plain_lines(lines) == [i for i, line in enumerate(lines) if not ptb._is_plain(line)]


def test_final_abbreviations_are_found_as_the_regex_finds_them():
    """A final single letter or abbreviation makes a caption non-plain (its period depends on
    the next caption), found by `_non_plain_lines` exactly as `_is_plain` finds it, for every
    abbreviation the lexer knows and random words, with and without a space before the period."""
    from vlmkit.metrics import ptb

    rng = random.Random(4)
    known = abbreviation_words()
    words = sorted(known) + ["a", "b", "x", "etc", "no", "nos", "figs", "bancorp", "inc", "ltd"]
    words += ["".join(rng.choice("abcdefgiklmnoprstuvz") for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    words = [w for w in words if w.isalpha()]
    lines = [f"x {w}." for w in words] + [f"A {w.capitalize()} ." for w in words]
    expected = [i for i, line in enumerate(lines) if not ptb._is_plain(line)]
    assert non_plain_lines(lines) == expected
    assert len(expected) > len(known)  # the abbreviations are found, in both forms
