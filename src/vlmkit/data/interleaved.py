"""Interleaved image-text documents (Flamingo's M3W / OpenFlamingo's MMC4 layout), no torch.

A record `{"segments": [{"image": "a.png"}, {"text": "..."}, {"image": "b.png"}, {"text": "..."}]}`
is one document: images and texts in reading order. `read_records` checks it with
`check_segments` (image paths resolved like `image`), so a bad document fails before training
with one sentence naming the record. Plain records (one `image`, its captions) are the one-chunk
case. Prompts written as text mark where images go with `<image>` (`split_at_images`).
"""
from __future__ import annotations

import os
from typing import Any

from vlmkit.errors import UserError

IMAGE_MARKER = "<image>"


def check_segments(segments: Any, where: str, base_dir: str) -> list[dict]:
    """The segments of an interleaved record, validated, with image paths resolved against `base_dir`.

    A document has at least one image and one text, every image is followed (somewhere after it)
    by text to learn from, and texts do not write `<image>` themselves (an image is its own segment).
    """
    if not isinstance(segments, list) or not segments:
        raise UserError(f"{where} is an empty document (\"segments\" has no items); give "
                        f"[{{\"image\": \"a.png\"}}, {{\"text\": \"...\"}}, ...] or drop the record")
    out = []
    for number, segment in enumerate(segments):
        keys = set(segment) if isinstance(segment, dict) else set()
        if keys == {"image"} and isinstance(segment["image"], str) and segment["image"]:
            path = segment["image"]
            out.append({"image": os.path.normpath(path if os.path.isabs(path) else os.path.join(base_dir, path))})
        elif keys == {"text"} and isinstance(segment["text"], str):
            if IMAGE_MARKER in segment["text"]:
                raise UserError(f"{where} segment {number} writes {IMAGE_MARKER} inside its text; put each image in its own "
                                f"{{\"image\": \"path\"}} segment")
            out.append({"text": segment["text"]})
        else:
            raise UserError(f"{where} segment {number} is not {{\"image\": \"path\"}} or {{\"text\": \"...\"}}; "
                            f"write each segment as exactly one of the two")
    if not any("image" in item for item in out):
        raise UserError(f"{where} is a document without images; add an {{\"image\": \"path\"}} segment or use a text-only dataset")
    if not any(item.get("text", "").strip() for item in out):
        raise UserError(f"{where} is a document without text; add {{\"text\": \"...\"}} segments after its images")
    last_text = max(index for index, item in enumerate(out) if item.get("text", "").strip())
    if any("image" in item for item in out[last_text + 1:]):
        raise UserError(f"{where} ends with an image after its last text, which nothing describes; drop that image or add "
                        f"a text segment after it")
    return out


def split_at_images(text: str, num_images: int, where: str = "the prompt") -> list[str]:
    """A prompt cut at its `<image>` markers into `num_images + 1` texts (text before image 1, after
    image 1, ...). A prompt without markers puts every image first. More or fewer markers than
    images is a UserError naming both counts."""
    parts = text.split(IMAGE_MARKER)
    markers = len(parts) - 1
    if markers == 0:
        return [""] * num_images + [text]
    if markers != num_images:
        raise UserError(f"{where} has {markers} {IMAGE_MARKER} marker(s) but {num_images} image(s) were given; write one "
                        f"{IMAGE_MARKER} per image (or none, to put the images first)")
    return parts
