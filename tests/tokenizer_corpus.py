"""A deterministic corpus of awkward strings for tokenizer parity tests.

`make_corpus()` mixes plain captions with the inputs that break tokenizers: punctuation runs,
accents and combining marks, CJK, right-to-left scripts, emoji (ZWJ sequences, skin tones, flags),
HTML entities, numbers, URLs, odd whitespace (tabs, newlines, NBSP, ideographic and zero-width
spaces), control characters, literal special tokens, words over 100 characters, texts far over 77
tokens, and the empty string. Every string is a valid Python str (no lone surrogates, which no
tokenizer accepts).
"""

from __future__ import annotations

import random

# fmt: off
NOUNS = (
    "dog cat man woman child bird horse car bus train plane boat pizza cake bicycle skateboard surfboard "
    "kite clock bench giraffe elephant zebra sheep cow umbrella laptop phone table chair street beach "
    "mountain river kitchen bathroom snow field"
).split()
ADJECTIVES = (
    "red blue green small large old young happy wooden shiny broken colorful empty crowded wet sunny dark "
    "bright tall tiny"
).split()
VERBS = (
    "sitting standing running eating holding riding flying looking walking sleeping playing jumping parked "
    "lying waiting"
).split()
PLACES = (
    "on the grass|in the kitchen|near a lake|at the beach|on a street|under a tree|in a field|"
    "next to a building|on a table|in the snow"
).split("|")

PUNCTUATION = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + [
    "...", "--", "—", "–", "…", "«", "»", "“", "”", "‘", "’", "¿", "¡", "·", "•", "§", "¶", "©", "®", "™",
    "°", "±", "×", "÷",
]
UNICODE_WORDS = [
    "café", "naïve", "Zürich", "Ångström", "façade", "résumé", "São Paulo", "Łódź", "Ærøskøbing", "straße",
    "İstanbul",
    # combining marks (NFC composes some)
    "e\u0301", "a\u0308bc", "n\u0303", "Z\u0335\u0321a\u0336l\u0337g\u0338o", "o\u0302\u0323",
    "東京", "日本語のテキスト", "北京欢迎你", "한국어 문장", "ｆｕｌｌｗｉｄｔｈ", "ﾊﾝｶｸ", "㍿", "ﬁ ligature",
    "مرحبا بالعالم", "שלום עולם", "\u202eright-to-left override\u202c", "فارسی", "اردو",
    "Привет мир", "Ελληνικά", "हिन्दी", "ภาษาไทย", "ქართული", "አማርኛ", "Tiếng Việt", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐛𝐨𝐥𝐝",
    "Ⅻ", "½", "²³", "①②", "٣٤٥", "१२३",
]
EMOJI = [
    "😀", "🐶", "🍕", "❤️", "❤", "👍🏽", "👨‍👩‍👧‍👦", "👩‍💻", "🏳️‍🌈", "🇫🇷", "🇯🇵🇺🇸", "🧑🏿‍🚀", "☺︎", "✈️", "#️⃣",
    "🫠", "🤷‍♀️",
]
HTML = [
    "&amp;", "&#39;", "&quot;", "&lt;b&gt;", "&nbsp;", "&#x27;", "&amp;amp;", "&copy;", "<br/>", "<p>hi</p>",
    "&#8217;",
]
WHITESPACE = [
    "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\u200b", "\u2028", "  ", "\x0b", "\x0c", "\u200d",
    "\ufeff",
]
CONTROL = ["\x00", "\x01", "\x1c", "\x1f", "\x7f", "\x85", "\ufffd", "\U0010ffff", "\ue000"]
SPECIAL_LITERALS = [
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "</w>",
    "<unk>",
]
# fmt: on


def _caption(rng: random.Random) -> str:
    parts = [
        rng.choice(["a", "an", "the", "two", "some", "A", "The"]),
        rng.choice(ADJECTIVES),
        rng.choice(NOUNS),
    ]
    if rng.random() < 0.8:
        parts.append(rng.choice(VERBS))
    if rng.random() < 0.7:
        parts.append(rng.choice(PLACES))
    text = " ".join(parts)
    if rng.random() < 0.3:
        text = text.capitalize()
    if rng.random() < 0.1:
        text = text.upper()
    if rng.random() < 0.5:
        text += rng.choice([".", "!", "?", "...", ",", " .", "!!!", ":)"])
    if rng.random() < 0.2:
        text = text.replace("'", "") + rng.choice(
            [" it's", " don't", " we're", " they've", " I'm", " you'll", " he'd", " dog's"]
        )
    return text


def _number(rng: random.Random) -> str:
    return rng.choice(
        [
            str(rng.randint(0, 10 ** rng.randint(1, 12))),
            f"{rng.uniform(-1000, 1000):.{rng.randint(0, 6)}f}",
            f"{rng.randint(1, 999)},{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}",
            f"{rng.randint(1900, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"+1 ({rng.randint(200, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
            f"{rng.randint(1, 99)}%",
            f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
            f"{rng.randint(1, 9)}e-{rng.randint(1, 30)}",
            f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}pm",
            f"{rng.randint(1, 400)}x{rng.randint(1, 400)}",
        ]
    )


def _url(rng: random.Random) -> str:
    host = rng.choice(
        [
            "example.com",
            "www.flickr.com",
            "i.imgur.com",
            "en.wikipedia.org",
            "xn--bcher-kva.example",
            "localhost:8080",
        ]
    )
    path = "/".join(
        rng.choice(NOUNS + ["img", "photos", "2021", "IMG_0042.JPG", "index.html"])
        for _ in range(rng.randint(0, 4))
    )
    query = rng.choice(["", "?q=cat&lang=en", "?id=123#frag", "?utm_source=x%20y"])
    return rng.choice(["http://", "https://", "", "ftp://"]) + host + "/" + path + query


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(11)
    if kind == 0:
        return _caption(rng)
    if kind == 1:
        return "".join(rng.choice(PUNCTUATION) for _ in range(rng.randint(1, 12)))
    if kind == 2:
        return rng.choice(UNICODE_WORDS)
    if kind == 3:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4)))
    if kind == 4:
        return rng.choice(HTML)
    if kind == 5:
        return _number(rng)
    if kind == 6:
        return _url(rng)
    if kind == 7:
        return rng.choice(WHITESPACE)
    if kind == 8:
        return rng.choice(CONTROL + SPECIAL_LITERALS)
    if kind == 9:  # random code points from assorted blocks (Latin to supplementary planes)
        start = rng.choice(
            [
                0x20,
                0xA0,
                0x300,
                0x400,
                0x600,
                0x900,
                0x1E00,
                0x2000,
                0x3040,
                0x4E00,
                0xAC00,
                0xFF00,
                0x1F300,
                0x20000,
            ]
        )
        return "".join(chr(start + rng.randrange(0x100)) for _ in range(rng.randint(1, 8)))
    return rng.choice(NOUNS) + rng.choice(["", "-", "_", "'", "’"]) + rng.choice(NOUNS)


def make_corpus(size: int = 12_000, seed: int = 0) -> list[str]:
    """`size` strings, the same on every run: fixed edge cases, captions, mixtures, long texts."""
    rng = random.Random(seed)
    fixed = [
        "",
        " ",
        "\t\n",
        "\u00a0",
        "a",
        "A",
        "!",
        "!!",
        "a photo of a cat",
        "A   photo\tof\na DOG.",
        "<|startoftext|>",
        "<|endoftext|>",
        "hello <|endoftext|>",
        "<|endoftext|> hello",
        "<|startoftext|>x<|endoftext|>",
        "[CLS] hello [SEP] [MASK]",
        "it's",
        "IT'S",
        "dog's",
        "don't",
        "'s",
        "''",
        "x" * 150,
        "supercalifragilistic" * 6,
        "word " * 200,
        "😀" * 100,
        "東京" * 80,
        ". " * 120,
        "&amp;" * 40,
        "9" * 300,
    ]
    fixed += UNICODE_WORDS + EMOJI + HTML + WHITESPACE + CONTROL + SPECIAL_LITERALS + PUNCTUATION
    corpus = list(fixed)
    while len(corpus) < size:
        roll = rng.random()
        if roll < 0.45:
            corpus.append(_caption(rng))
        elif roll < 0.9:
            corpus.append(rng.choice(["", " ", "  "]).join(_fragment(rng) for _ in range(rng.randint(1, 6))))
        else:  # long texts, far past 77 tokens
            corpus.append(" ".join(_fragment(rng) for _ in range(rng.randint(20, 80))))
    return corpus
