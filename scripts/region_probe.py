"""How much colour / shape a fusion run's region features carry, before the fusion encoder.

For the first 200 records of DATA (with object boxes), each object's pooled backbone feature
(`model.visual_tokens`, the region token of its box) is centred over the set and classified by nearest
class centroid (centroids from the even-indexed regions, accuracy on the odd ones) by colour, by shape and
by class; also the mean cosine between regions of one image and of different images. One line of JSON
per run. Used for the README's VisualBERT pre-training ablation.

    PYTHONPATH=src .venv/bin/python scripts/region_probe.py DATA/test.jsonl RUN [RUN ...]
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import vlmkit
from vlmkit.data.formats import read_records


def probe(run: str, records: list[dict]) -> dict:
    model = vlmkit.load(run).eval()
    features, names = [], []  # one row per object region
    offset = 1 if model.config.visual.image_region else 0  # region 0 is the whole image
    with torch.no_grad():
        for start in range(0, len(records), 50):
            chunk = records[start : start + 50]
            pixels = model.preprocess([record["image"] for record in chunk]).to(model.device)
            regions = model.region_inputs(chunk)
            tokens = model.visual_tokens(pixels, regions)
            for row, (real, labels) in enumerate(zip(regions["region_mask"], regions["region_labels"])):
                for column in real.nonzero()[:, 0].tolist():
                    features.append(tokens.features[row, offset + column])
                    names.append((start + row, model.config.region_classes[labels[column]]))
    centred = torch.stack(features)
    centred = F.normalize(centred - centred.mean(0), dim=1)  # (R, C)
    image = torch.tensor([owner for owner, _ in names])
    cosine = centred @ centred.T
    same = (image[:, None] == image[None]) & ~torch.eye(len(image), dtype=torch.bool)
    result = {"run": run, "regions": len(names), "within_image_cosine": cosine[same].mean().item(),
              "across_images_cosine": cosine[image[:, None] != image[None]].mean().item()}
    train = torch.arange(len(names)) % 2 == 0
    for key, part in (("colour", 0), ("shape", 1), ("class", None)):
        labels = [name if part is None else name.split()[part] for _, name in names]
        classes = sorted(set(labels))
        target = torch.tensor([classes.index(label) for label in labels])
        centroids = torch.stack([centred[train & (target == c)].mean(0) if bool((train & (target == c)).any())
                                 else centred.new_zeros(centred.shape[1]) for c in range(len(classes))])
        predicted = (centred[~train] @ F.normalize(centroids, dim=1).T).argmax(1)
        result[f"{key}_accuracy"] = (predicted == target[~train]).float().mean().item()
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in result.items()}


if __name__ == "__main__":
    records = [record for record in read_records(sys.argv[1]) if record.get("objects")][:200]
    for run in sys.argv[2:]:
        print(json.dumps(probe(run, records)))
