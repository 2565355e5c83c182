"""Seeded synthetic caption corpora for metric parity tests and benchmarks.

The captions are built from templates and deliberately sprinkled with the things that make
PTB tokenization hard (contractions, hyphens, numbers, currency, times, abbreviations, quotes,
brackets, URLs, unicode), so that a parity check against the reference tools exercises more
than plain lowercase words. Everything is driven by one `random.Random(seed)`.
"""
from __future__ import annotations

import random

_SUBJECTS = [
    "a man", "a woman", "two dogs", "the cat", "a young boy", "an old lady", "three kids",
    "a group of people", "a brown horse", "the chef", "a surfer", "a baseball player",
    "a little girl", "some birds", "a red car", "the police officer", "a teddy bear", "my friend",
]
_VERBS = [
    "is riding", "rides", "sits on", "is standing next to", "holds", "looks at", "walks along",
    "plays with", "is eating", "jumps over", "runs toward", "is parked near", "carries", "throws",
    "is cutting", "watches", "leans against", "is sleeping on",
]
_OBJECTS = [
    "a bench", "the beach", "a frisbee", "a plate of food", "the kitchen counter", "a skateboard",
    "the ocean waves", "a large pizza", "a wooden table", "the street", "a tennis racket",
    "a grassy field", "the snow", "a white plate", "a laptop computer", "a red umbrella",
    "the traffic light", "a cake with candles",
]
_PLACES = ["in the park", "on the street", "at night", "near the water", "in a kitchen",
           "under a tree", "during the day", "inside a room", "next to a building", "on the grass"]

# Tricky fragments, grouped by what they stress in the tokenizer.
_TRICKY = {
    "contractions": ["doesn't", "can't", "won't", "isn't", "it's", "man's", "they're", "I'm",
                     "we'll", "you've", "he'd", "ain't", "y'all", "o'clock", "'em", "dogs'",
                     "shouldn't", "let's", "cannot", "gonna", "wanna", "gotta", "DON'T", "Can't",
                     "O'Neil's", "rock 'n' roll", "ma'am", "'tis", "d'Artagnan", "Cap'n"],
    "hyphens": ["well-known", "3-year-old", "x-ray", "t-shirt", "black-and-white", "self-driving",
                "co-ed", "pro-choice", "anti-war", "re-enter", "e-mail", "-", " - ", "--", "---",
                "mother-in-law", "high-five", "U-turn", "twenty-one", "_under_score", "a-", "-b"],
    "numbers": ["3", "3.5", "1,000", "2nd", "21st", "1980s", "'80s", "-5", "+3", "4x4", "10am",
                "2:30pm", "24/7", "1/2", "1 1/2", "\u00bd", "3/4", "100%", "0.5", ".5", "1.000.000",
                "#1", "No. 5", "7th", "1st-place", "50/50", "1-800-555-1212", "(800) 555-1212",
                "555-1212", "12-12-2012", "1/2/2003", "v2.0", "3D", "B52", "COVID-19", "1e5"],
    "currency": ["$5", "$5.99", "\u00a33", "\u20ac4", "\u00a5100", "50\u00a2", "US$10", "5 dollars",
                 "$ 20", "A$3", "C$4", "\u20a4", "$1,000,000"],
    "times": ["10:30", "10:30 a.m.", "3 p.m.", "noon", "5 PM", "12:00:00", "9am-5pm", "8 o'clock",
              "at 7:45.", "Jan. 5", "Feb 2", "Sept. 11th", "Mon.", "2014-09-02"],
    "abbreviations": ["Mr. Smith", "Dr. Who", "St. Mary's", "the U.S.", "U.S.A.", "etc.", "e.g.",
                      "i.e.", "vs.", "Inc.", "No.", "a.k.a.", "Mrs. Jones", "Jr.", "Calif.",
                      "Ave.", "Ph.D.", "a.m.", "Co.", "Corp.", "Mt. Fuji", "Prof. X", "Sen.", "Gov.",
                      "the letter a.", "the letter B.", "plan B.", "Ltd.", "Bros.", "al.", "Wash."],
    "quotes": ['"hello"', "'hi'", "\u201ccurly\u201d", "\u2018single\u2019", "``latex''", '" spaced "',
               "'quoted' words", 'said "yes",', "\u00abguillemets\u00bb", "it\u2019s", "\u201e low\u201c",
               "'", '"', "''", "`", "`tick'"],
    "brackets": ["(a dog)", "[sic]", "{braces}", "<angle>", "( spaced )", "(1)", "(a)", "[2]",
                 "-LRB-", "(TM)", ")(", "((double))", "f(x)"],
    "unicode": ["caf\u00e9", "na\u00efve", "r\u00e9sum\u00e9", "Z\u00fcrich", "\u65e5\u672c",
                "\U0001f600", "\u2605", "\u2192", "\u00a9", "\u00b0", "\u2014", "\u2013", "\u2026",
                "stra\u00dfe", "\u00d8", "se\u00f1or", "\u00c9COLE", "\u03b1\u03b2\u03b3", "\u0416\u0443\u043a",
                "\u00d7", "\u2122", "\u00ae", "\u2022", "\u00b7", "\u00bf", "\u00a1", "\u2033", "\u00b2",
                "\u00e6on", "\u0131", "\u0130stanbul", "\uff01", "\u00a0", "\u2009", "\u200b"],
    "urls": ["www.example.com", "http://foo.org/a/b", "a@b.com", "example.org", "https://x.io/?q=1",
             "john.doe@mail.net", "foo.bar", "node.js", "file.txt"],
    "punctuation": ["!", "?", "...", ";", ":", ",", "!!", "?!", ". . .", "..", "....", "&", "&amp;",
                    "AT&T", "R&D", "a & b", "*", "**", "@", "#", "~", "^", "|", "\\", "/", "w/",
                    "and/or", "=", "+", "%", "S&P-500", "AT & T", "Q&A", "<3", ":)", ";-)", "C++",
                    "C#", "F#", ".NET", "..."],
}

_ENDINGS = ["", ".", " .", "!", "?", "...", ".", ".", ".", " ", "  .", ".\u2026", "!?", " ;", ",",
            "'", '"', ".\"", ".'", ")", "-"]


def _case(rng: random.Random, text: str) -> str:
    roll = rng.random()
    if roll < 0.6:
        return text[:1].upper() + text[1:]
    if roll < 0.7:
        return text.upper()
    if roll < 0.8:
        return text.title()
    return text


_COCO_ENDINGS = [".", ".", ".", "", " ."]


def random_caption(rng: random.Random, tricky: float = 0.5, style: str = "varied") -> str:
    """One caption: a template sentence, with probability `tricky` per slot of a hard fragment.

    `style="coco"` imitates COCO captions (sentence case, plain spacing, a period or nothing at
    the end); `"varied"` also varies case, spacing and the final punctuation.
    """
    if style == "coco":
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.5:
            words.append(rng.choice(_PLACES))
        if rng.random() < tricky:
            fragment = rng.choice(_TRICKY[rng.choice(list(_TRICKY))])
            words.insert(rng.randrange(len(words) + 1), fragment)
        text = " ".join(words)
        return text[:1].upper() + text[1:] + rng.choice(_COCO_ENDINGS)
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_PLACES))
    n_tricky = 0
    while rng.random() < tricky and n_tricky < 4:
        fragment = rng.choice(_TRICKY[rng.choice(list(_TRICKY))])
        words.insert(rng.randrange(len(words) + 1), fragment)
        n_tricky += 1
    separator = " " if rng.random() < 0.9 else rng.choice(["  ", "\t", " \u00a0", "   "])
    text = separator.join(words)
    if rng.random() < 0.1:
        # glue punctuation onto neighbours, as careless writers do
        text = text.replace(" ,", ",").replace(" .", ".")
    text = _case(rng, text) + rng.choice(_ENDINGS)
    if rng.random() < 0.05:
        text = " " + text
    return text


def random_corpus(n_images: int, n_refs: int = 5, seed: int = 0, tricky: float = 0.5, style: str = "varied"
                  ) -> tuple[dict[int, str], dict[int, list[str]]]:
    """`(predictions, references)` for `n_images` images with `n_refs` references each.

    Predictions are sometimes a perturbed copy of a reference (so scores span a useful range
    instead of hugging zero) and sometimes an independent caption.
    """
    rng = random.Random(seed)
    predictions: dict[int, str] = {}
    references: dict[int, list[str]] = {}
    for image_id in range(n_images):
        refs = [random_caption(rng, tricky, style) for _ in range(n_refs)]
        references[image_id] = refs
        if rng.random() < 0.5:
            words = rng.choice(refs).split()
            for _ in range(rng.randrange(4)):
                if words and rng.random() < 0.5:
                    del words[rng.randrange(len(words))]
                else:
                    words.insert(rng.randrange(len(words) + 1), rng.choice(["a", "the", "dog", "red", "is"]))
            predictions[image_id] = " ".join(words) or "a"
        else:
            predictions[image_id] = random_caption(rng, tricky, style)
    return predictions, references
