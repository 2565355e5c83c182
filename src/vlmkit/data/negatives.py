"""Hard negative captions for contrastive training (NegCLIP, Yuksekgonul et al. 2023).

CLIP-style models trained on image-caption pairs behave like bags of words: they score "a red star
left of a blue circle" and "a blue circle left of a red star" alike (the ARO benchmark), because a
batch's other captions almost never differ from the right one by word order alone, so the loss
never asks the image embedding to tell them apart. NegCLIP adds, for every caption, a perturbed
copy with the same words and a different meaning as one more text the image must score lower.

NegCLIP perturbs with a parser (swap nouns, adjectives, noun phrases); this module needs none and
works on any caption:

- `spatial`: one spatial word replaced by its opposite ("left" -> "right", "above" -> "below",
  "top" -> "bottom", ...). For a spatial relation this is exactly ARO's subject-object swap:
  "A left of B" means "B right of A", so the negative "A right of B" says "B left of A".
- `swap`: two different content words (not articles or prepositions) exchange places, NegCLIP's
  order negative: "a red star and a blue circle" -> "a blue star and a red circle" binds the
  colours to the other shapes.

`hard_negative` tries the kinds in `kinds` in a random order (drawn from `rng`) and returns the
first that applies, or None for a caption none applies to (one word, say).
"""
from __future__ import annotations

import random
import re
from typing import Sequence

KINDS: tuple[str, ...] = ("spatial", "swap")

# Each word and its opposite, in both directions.
_OPPOSITE_PAIRS = (("left", "right"), ("above", "below"), ("top", "bottom"), ("upper", "lower"), ("over", "under"),
                   ("front", "behind"), ("before", "after"), ("inside", "outside"), ("beneath", "atop"))
SPATIAL_OPPOSITES: dict[str, str] = {a: b for a, b in _OPPOSITE_PAIRS} | {b: a for a, b in _OPPOSITE_PAIRS}

# Words a swap leaves in place: exchanging them changes grammar, not what the caption claims.
_FUNCTION_WORDS = frozenset(
    "a an the of and or to in on at by with from for is are was were be this that these those it its "
    "there here some one photo image picture".split())

_WORD = re.compile(r"[A-Za-z]+")


def validate_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds as a tuple, or ValueError naming an unknown one."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"hard negative kinds must be some of {list(KINDS)}, got {list(kinds)}")
    return tuple(kinds)


def _spatial(words: list[re.Match], text: str, rng: random.Random) -> str | None:
    spots = [match for match in words if match.group().lower() in SPATIAL_OPPOSITES]
    if not spots:
        return None
    match = rng.choice(spots)
    opposite = SPATIAL_OPPOSITES[match.group().lower()]
    if match.group()[0].isupper():
        opposite = opposite.capitalize()
    return text[:match.start()] + opposite + text[match.end():]


def _swap(words: list[re.Match], text: str, rng: random.Random) -> str | None:
    content = [match for match in words if match.group().lower() not in _FUNCTION_WORDS]
    pairs = [(a, b) for i, a in enumerate(content) for b in content[i + 1:] if a.group().lower() != b.group().lower()]
    if not pairs:
        return None
    first, second = rng.choice(pairs)  # first starts before second
    return (text[:first.start()] + second.group() + text[first.end():second.start()] + first.group()
            + text[second.end():])


_PERTURB = {"spatial": _spatial, "swap": _swap}


def hard_negative(text: str, rng: random.Random, kinds: Sequence[str] = KINDS) -> str | None:
    """A caption with (nearly) the words of `text` and a different meaning, or None (see the module)."""
    words = list(_WORD.finditer(text))
    order = list(kinds)
    rng.shuffle(order)
    for kind in order:
        negative = _PERTURB[kind](words, text, rng)  # always differs from `text` when not None
        if negative is not None:
            return negative
    return None
