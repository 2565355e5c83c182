"""Hard-negative accuracy (ARO-style): does an image score its caption above the caption's hard negative?

For every caption of every record, `vlmkit.data.negatives.hard_negative` builds one negative per
kind that applies (`spatial`: a spatial word flipped, "left of" -> "right of", which for a relation
is ARO's subject-object swap; `swap`: two content words exchanged, ARO's order test). The score
per kind is the fraction of (caption, negative) pairs where cos(image, caption) > cos(image,
negative); 0.5 is a bag-of-words model, which cannot tell the two apart. The negatives are seeded
(`seed`, the caption's position), so two models are scored on the same pairs.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from vlmkit.capabilities import EmbedsImages, EmbedsTexts
from vlmkit.errors import UserError


def evaluate_hard_negatives(model, records: Sequence[dict], kinds: Sequence[str] | None = None, seed: int = 0) -> dict:
    """{"accuracy": over every pair, "per_kind": {kind: accuracy}, "pairs": {kind: count}, "n_images"}."""
    from vlmkit.data.negatives import KINDS, hard_negative, validate_kinds

    try:
        kinds = validate_kinds(list(kinds) if kinds else list(KINDS))
    except ValueError as error:
        raise UserError(str(error)) from None
    model.require(EmbedsImages, task="hard-negative accuracy")
    model.require(EmbedsTexts, task="hard-negative accuracy")
    records = [record for record in records if record.get("texts")]
    if not records:
        raise UserError("no record has captions ('text' or 'texts'); hard-negative accuracy needs image-caption pairs")
    image_of, captions, negatives, kind_of = [], [], [], []  # one entry per (caption, negative) pair
    for index, record in enumerate(records):
        for number, text in enumerate(record["texts"]):
            for kind in kinds:
                negative = hard_negative(text, random.Random(f"vlmkit-hard-negative:{seed}:{index}:{number}:{kind}"), (kind,))
                if negative is not None:
                    image_of.append(index), captions.append(text), negatives.append(negative), kind_of.append(kind)
    if not captions:
        raise UserError(f"none of the captions has a hard negative of the kinds {list(kinds)} "
                        "(spatial needs a word such as left/right/above/below; swap two different content words)")
    used = sorted(set(image_of))
    row = {index: position for position, index in enumerate(used)}
    images = model.embed_images([records[index]["image"] for index in used])[[row[i] for i in image_of]]  # (P, D)
    unique = sorted(set(captions) | set(negatives))
    column = {text: position for position, text in enumerate(unique)}
    texts = model.embed_texts(unique)  # (T, D), L2-normalised
    positive = (images * texts[[column[t] for t in captions]]).sum(-1)  # (P,)
    negative = (images * texts[[column[t] for t in negatives]]).sum(-1)  # (P,)
    wins = (positive > negative).float()
    per_kind, pairs = {}, {}
    for kind in kinds:
        of_kind = torch.tensor([of == kind for of in kind_of])  # (P,)
        if of_kind.any():
            per_kind[kind], pairs[kind] = round(wins[of_kind].mean().item(), 4), int(of_kind.sum())
    return {"accuracy": round(wins.mean().item(), 4), "per_kind": per_kind, "pairs": pairs, "n_images": len(used)}
