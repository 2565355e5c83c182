"""Open-vocabulary detection: box AP (pycocotools' numbers) on base and on novel classes.

Records carry `objects` ([{name, box}], boxes `[x0, y0, x1, y1]` in image pixels). The classes are
every object name of the evaluation records; the novel ones are those a detector never saw
labelled in training (the synthetic data's `--holdout` pairs, read from the data folder's
`meta.json` when not given). The model detects by name, through the `Detects` capability, among
all classes at once; AP is then reported over all classes, over the base classes and over the
novel classes (each the mean over its categories, as COCOeval with those category ids).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from vlmkit.capabilities import Detects, require
from vlmkit.data.objects import check_objects
from vlmkit.errors import UserError

AP_KEYS = ("AP", "AP50", "AP75")


def holdout_of(data_path: str | Path) -> list[str]:
    """The `--holdout` classes recorded in the `meta.json` next to a synthetic dataset (empty if none)."""
    meta = Path(data_path).parent / "meta.json"
    try:
        return list(json.loads(meta.read_text()).get("holdout", []))
    except (OSError, ValueError, AttributeError):
        return []


def evaluate_detection(model, records: list[dict], novel: Sequence[str] = (), batch_size: int = 32) -> dict:
    """Box AP of `model` (a `Detects` model) on `records`, over all, base and novel classes.

    A record whose objects are malformed, of zero area or outside the image is a UserError naming
    it (evaluation input is the user's to fix). Returns {"AP", "AP50", "AP75", "base": {...},
    "novel": {...}, "per_category": {name: AP}, "classes", "novel_classes", "n_images"}; a group
    without classes in the data is null.
    """
    import torch

    from vlmkit.data.formats import load_image
    from vlmkit.metrics.detection import coco_box_ap, xyxy_to_xywh

    require(model, Detects, task="eval detection")
    records = [record for record in records if "objects" in record]
    if not records:
        raise UserError("no evaluation record has 'objects' ([{name, box}]); give detection records "
                        "(vlmkit data synth writes them)")
    labels = sorted({obj["name"] for record in records for obj in record["objects"] if isinstance(obj, dict)
                     and isinstance(obj.get("name"), str)} | set(novel))
    ground_truth, detections = [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [load_image(record["image"]) for record in chunk]
        for record, image in zip(chunk, images):
            problem = check_objects(record, image.size)
            if problem:
                raise UserError(f"detection record with image {record['image']}: {problem}; fix or remove the record")
        pixels = model.detection_inputs(images)  # (B, 3, S, S)
        with torch.no_grad():
            found = model.detect(pixels, labels)
        side_y, side_x = pixels.shape[-2:]
        for record, image, result in zip(chunk, images, found):
            scale = torch.tensor([image.size[0] / side_x, image.size[1] / side_y] * 2, dtype=torch.float64)
            boxes = result["boxes"].detach().double().cpu() * scale  # (N, 4) in image pixels
            ground_truth.append([{"bbox": xyxy_to_xywh(obj["box"]), "category": labels.index(obj["name"]) + 1}
                                 for obj in record["objects"]])
            detections.append([{"bbox": xyxy_to_xywh(box.tolist()), "score": float(score), "category": int(label) + 1}
                               for box, score, label in zip(boxes, result["scores"].cpu(), result["labels"].cpu())])
    novel_set = set(novel)
    categories = list(range(1, len(labels) + 1))
    groups = {"base": [c for c in categories if labels[c - 1] not in novel_set],
              "novel": [c for c in categories if labels[c - 1] in novel_set]}
    overall = coco_box_ap(ground_truth, detections, categories=categories, groups=groups)
    result: dict = {key: overall[key] for key in (*AP_KEYS, "base", "novel")}
    result["per_category"] = {labels[c - 1]: overall["per_category"][c] for c in categories}
    result["classes"] = labels
    result["novel_classes"] = sorted(novel_set)
    result["n_images"] = len(records)
    print(f"vlmkit: detection AP {overall['AP']:.4f} over {len(labels)} classes "
          f"({len(novel_set)} novel) on {len(records)} images", file=sys.stderr)
    return result
