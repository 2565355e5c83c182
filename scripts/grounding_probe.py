"""Does a VisualBERT run's masked-language model read the image? A grounding probe of its pre-training.

For the first 200 records of DATA with object boxes, every word of a caption that is the colour or the
shape of one of the data's objects (object names are "COLOUR SHAPE", as the built-in data writes them) is
masked in turn and predicted by the run's MLM head, once with the record's own image and regions and once
with another record's (the images rolled by one): a model that reads the image is right more often with
its own image; one that fills the word from the caption's text alone scores the same both ways. Also the
mean cosine between the fused visual tokens of one image (the encoder's last layer), the collapse the
README's VisualBERT section reports. One line of JSON per run. Used for the README's VisualBERT rows.

    PYTHONPATH=src .venv/bin/python scripts/grounding_probe.py DATA/test.jsonl RUN [RUN ...]
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import vlmkit
from vlmkit.data.formats import read_records


def caption_words(caption: str) -> list[str]:
    """The words of a caption as the probe masks them (a comma is a word of its own)."""
    return caption.replace(",", " ,").split()


def masked_words(records: list[dict], tokenizer, parts: dict[str, set[str]]) -> list[tuple[int, str, torch.Tensor, int, int]]:
    """(record index, part, masked token row (L,), masked position, target id) for every colour / shape word
    of each record's first caption that is one token."""
    items = []
    for index, record in enumerate(records):
        words = caption_words(record["texts"][0])
        whole = tokenizer([" ".join(words)])[0]
        for position, word in enumerate(words):
            part = next((name for name, vocabulary in parts.items() if word in vocabulary), None)
            if part is None:
                continue
            masked = tokenizer([" ".join(words[:position] + ["[MASK]"] + words[position + 1:])])[0]
            where = (masked == tokenizer.mask_id).nonzero()[:, 0]
            if len(where) != 1 or len(whole) != len(masked):  # the word is several tokens
                continue
            items.append((index, part, masked, int(where[0]), int(whole[where[0]])))
    return items


@torch.no_grad()
def probe(run: str, records: list[dict], parts: dict[str, set[str]]) -> dict:
    model = vlmkit.load(run).eval()
    pixels = model.preprocess([record["image"] for record in records]).to(model.device)
    regions = {key: value.to(model.device) for key, value in model.region_inputs(records).items()}
    visual = model.visual_tokens(pixels, regions)
    embeds, mask = model.embeds_of(visual), visual.mask  # (N, T, E), (N, T)
    items = masked_words(records, model.tokenizer, parts)
    hits = {(part, own): 0 for part in parts for own in (True, False)}
    counts = {part: 0 for part in parts}
    for start in range(0, len(items), 64):
        chunk = items[start : start + 64]
        tokens = torch.stack([row for _, _, row, _, _ in chunk]).to(model.device)  # (B, L)
        owners = torch.tensor([index for index, *_ in chunk])
        positions = torch.tensor([position for *_, position, _ in chunk])
        targets = torch.tensor([target for *_, target in chunk])
        for own in (True, False):
            images = owners if own else (owners + 1) % len(records)  # another record's image and regions
            hidden = model.encode(tokens, embeds[images], mask[images])  # (B, L + T, W)
            predicted = model.mlm_logits(hidden[torch.arange(len(chunk)), positions]).argmax(-1).cpu()
            for (_, part, *_), right in zip(chunk, (predicted == targets).tolist()):
                hits[part, own] += right
        for _, part, *_ in chunk:
            counts[part] += 1
    # the fused visual tokens of one image: (N, T, W) -> mean cosine between its real tokens
    length = 4
    hidden = model.encode(torch.full((len(records), length), model.tokenizer.mask_id, device=model.device), embeds, mask)
    fused = F.normalize(hidden[:, length:], dim=-1)
    pairs = (mask[:, :, None] & mask[:, None, :]) & ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    result = {"run": run, "words": counts, "fused_visual_cosine": round(float((fused @ fused.transpose(1, 2))[pairs].mean()), 3)}
    for part in parts:
        result[f"{part}_own_image"] = round(hits[part, True] / max(counts[part], 1), 3)
        result[f"{part}_other_image"] = round(hits[part, False] / max(counts[part], 1), 3)
    return result


def object_parts(records: list[dict]) -> dict[str, set[str]]:
    """{"colour": first words, "shape": last words} of the records' "COLOUR SHAPE" object names."""
    names = [obj["name"].split() for record in records for obj in record["objects"]]
    return {"colour": {name[0] for name in names if len(name) == 2}, "shape": {name[-1] for name in names}}


if __name__ == "__main__":
    records = [record for record in read_records(sys.argv[1]) if record.get("objects") and record.get("texts")][:200]
    parts = object_parts(records)
    for run in sys.argv[2:]:
        print(json.dumps(probe(run, records, parts)))
