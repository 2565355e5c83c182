"""Zero-shot classification with prompt ensembling (CLIP / CLIP_benchmark protocol).

Each class embedding is the re-normalised mean of its L2-normalised template embeddings;
logits = 100 * image @ classes.T; scored with top-1, top-5 and mean per-class recall.
"""
from __future__ import annotations

from vlmkit.capabilities import EmbedsImages, EmbedsTexts

import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from vlmkit.errors import UserError

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a rendering of a {}.",
)


def read_templates(path: str | Path | None) -> tuple[str, ...]:
    """Templates from a file (one per line, each with exactly one '{}' for the class name), or the defaults."""
    if path is None:
        return DEFAULT_TEMPLATES
    path = Path(path)
    if not path.exists():
        raise UserError(f"templates file {path} does not exist")
    if not path.is_file():
        raise UserError(f"templates file {path} is not a regular file (a folder, a device or a pipe); give a text file")
    from vlmkit.textfiles import decode_text

    text = decode_text(path.read_bytes(), str(path))
    templates = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not templates:
        raise UserError(f"templates file {path} is empty; write one template per line, each with a '{{}}' for the class name")
    for template in templates:
        problem = _template_problem(template)
        if problem:
            raise UserError(f"templates file {path}: line {template!r} {problem}; write one '{{}}' where the class name "
                            f"goes (double other braces: '{{{{' and '}}}}')")
    return templates


def _template_problem(template: str) -> str | None:
    """Why `template` cannot be filled with one class name by `str.format`, or None when it can."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        return f"has unbalanced braces ({error})"
    if len(fields) != 1:
        return f"has {len(fields)} '{{}}' fields, not one"
    if fields[0] != "":
        return f"has the named field '{{{fields[0]}}}'"
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as error:
        return f"cannot be filled in ({error})"
    return None


@torch.no_grad()
def class_embeddings(model, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) normalised class embeddings, each the mean over its filled-in templates."""
    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = model.embed_texts(prompts).view(len(classnames), len(templates), -1)  # (C, T, D), each row normalised
    return F.normalize(embeddings.mean(dim=1), dim=-1)  # (C, D)


def zeroshot_logits(model, images: Sequence, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(N, C) logits = 100 * image embeddings @ class embeddings."""
    model.require(EmbedsImages, task="zero-shot classification")
    model.require(EmbedsTexts, task="zero-shot classification")
    weights = class_embeddings(model, classnames, templates)
    return 100.0 * model.embed_images(images) @ weights.T


def evaluate_zeroshot(model, records: Sequence[dict], label_key: str = "label", templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict:
    """Top-1/top-5/mean per-class recall over the records that carry a label; classes = distinct labels."""
    from vlmkit.metrics.classification import zeroshot_scores

    labelled = [record for record in records if record.get(label_key) is not None]
    left_out = len(records) - len(labelled)
    if left_out:
        print(f"vlmkit: zero-shot leaves out {left_out} record(s) without a '{label_key}'", file=sys.stderr)
    if not labelled:
        raise UserError(f"no record has a '{label_key}' field; choose the label field with --label-key")
    classnames = sorted({str(record[label_key]) for record in labelled})
    targets = torch.tensor([classnames.index(str(record[label_key])) for record in labelled])
    logits = zeroshot_logits(model, [record["image"] for record in labelled], classnames, templates)
    return {**zeroshot_scores(logits, targets), "n": len(labelled), "classes": len(classnames)}
