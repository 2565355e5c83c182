"""Box AP against pycocotools' COCOeval itself, on generated detections (seeded)."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from vlmkit.errors import UserError
from vlmkit.metrics.detection import coco_box_ap, xyxy_to_xywh

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _scene(seed: int, num_images: int = 24, categories=(1, 2, 3, 4, 5, 6)):
    """Ground truth and detections with every hard case: score ties, duplicate detections,
    jittered near-misses, false positives, images without ground truth, an image with more
    than 100 detections, boxes in all three area ranges, a category with no ground truth (6)."""
    rng = np.random.default_rng(seed)
    ground_truth, detections = [], []
    for image in range(num_images):
        gts, dts = [], []
        for _ in range(0 if image % 7 == 3 else int(rng.integers(1, 8))):
            side = float(rng.choice([rng.uniform(4, 30), rng.uniform(33, 95), rng.uniform(97, 200)]))
            x, y = (float(v) for v in rng.uniform(0, 300, size=2))
            box = [x, y, side * float(rng.uniform(0.5, 1.5)), side]
            cat = int(rng.choice(categories[:-1]))
            gts.append({"bbox": box, "category": cat})
            for _ in range(int(rng.integers(0, 4))):  # near-misses and duplicates
                jitter = rng.normal(0, 0.15 * side, size=4) * (rng.random() < 0.7)
                dbox = [box[0] + jitter[0], box[1] + jitter[1], max(1.0, box[2] + jitter[2]),
                        max(1.0, box[3] + jitter[3])]
                label = cat if rng.random() < 0.85 else int(rng.choice(categories))
                dts.append({"bbox": dbox, "category": label, "score": round(float(rng.random()), 1)})
        for _ in range(int(rng.integers(0, 5)) + (130 if image == 5 else 0)):  # false positives
            dts.append({"bbox": [float(v) for v in rng.uniform(0, 300, size=2)] +
                        [float(v) for v in rng.uniform(2, 120, size=2)],
                        "category": int(rng.choice(categories)), "score": round(float(rng.random()), 2)})
        ground_truth.append(gts)
        detections.append(dts)
    return ground_truth, detections


def _pycocotools(ground_truth, detections, categories, evaluated=None):
    dataset = {"images": [{"id": i} for i in range(len(ground_truth))],
               "categories": [{"id": c} for c in categories], "annotations": []}
    for image, gts in enumerate(ground_truth):
        for g in gts:
            dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": image,
                                           "category_id": g["category"], "bbox": list(g["bbox"]),
                                           "area": g["bbox"][2] * g["bbox"][3], "iscrowd": 0})
    results = [{"image_id": image, "category_id": d["category"], "bbox": list(d["bbox"]), "score": d["score"]}
               for image, dts in enumerate(detections) for d in dts]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        if evaluated is not None:
            evaluator.params.catIds = list(evaluated)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]
    per_category = {}
    for k, cat in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        per_category[cat] = None if not (values > -1).any() else float(np.mean(values[values > -1]))
    return dict(zip(STAT_NAMES, (float(s) for s in evaluator.stats))), per_category


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_ap_equals_pycocotools(seed):
    categories = (1, 2, 3, 4, 5, 6)
    ground_truth, detections = _scene(seed, categories=categories)
    ours = coco_box_ap(ground_truth, detections, categories=categories)
    reference, reference_per_category = _pycocotools(ground_truth, detections, categories)
    assert 0.05 < reference["AP"] < 0.95  # the scene is neither trivial nor hopeless
    for name in STAT_NAMES:
        assert ours[name] == pytest.approx(reference[name], abs=1e-12), name
    assert ours["per_category"].keys() == reference_per_category.keys()
    assert ours["per_category"][6] is None
    for cat, value in reference_per_category.items():
        assert ours["per_category"][cat] == pytest.approx(value, abs=1e-12) if value is not None \
            else ours["per_category"][cat] is None


def test_category_groups_equal_pycocotools_with_those_category_ids():
    categories = (1, 2, 3, 4, 5, 6)
    ground_truth, detections = _scene(4, categories=categories)
    ours = coco_box_ap(ground_truth, detections, categories=categories, groups={"few": [2, 5, 6], "none": []})
    reference, _ = _pycocotools(ground_truth, detections, categories, evaluated=[2, 5, 6])
    for name in ("AP", "AP50", "AP75"):
        assert ours["few"][name] == pytest.approx(reference[name], abs=1e-12), name
    assert ours["few"]["AP"] != pytest.approx(ours["AP"], abs=1e-6)  # a subset, not the whole
    assert ours["none"] is None


def test_perfect_and_empty_cases():
    gts = [[{"bbox": [0, 0, 10, 10], "category": 1}], []]
    assert coco_box_ap(gts, [[{"bbox": [0, 0, 10, 10], "category": 1, "score": 0.9}], []])["AP"] == pytest.approx(1.0)
    assert coco_box_ap(gts, [[], []])["AP"] == 0.0
    # a wrong duplicate with a higher score ranks first: precision at full recall falls to 1/2
    dup = [[{"bbox": [50, 50, 10, 10], "category": 1, "score": 0.95},
            {"bbox": [0, 0, 10, 10], "category": 1, "score": 0.9}], []]
    assert coco_box_ap(gts, dup)["AP50"] == pytest.approx(0.5)


def test_xyxy_and_bad_input():
    assert xyxy_to_xywh([2, 3, 12, 8]) == [2.0, 3.0, 10.0, 5.0]
    with pytest.raises(UserError, match="one detection list per image"):
        coco_box_ap([[]], [])
    with pytest.raises(UserError, match="4 numbers"):
        coco_box_ap([[{"bbox": [0, 0, 1], "category": 1}]], [[]])


# ---- the detection task over the Detects capability (an oracle and a blind detector) ----------

class _Detector:
    """Detects by reading the answers off the records (oracle) or finding nothing (blind)."""

    from vlmkit.capabilities import Detects
    capabilities = (Detects,)
    family = "test-detector"

    def __init__(self, records, blind_to=()):
        self.answers = [record["objects"] for record in records]
        self.blind_to = set(blind_to)
        self.calls = 0

    def detection_inputs(self, images):
        import torch

        return torch.zeros(len(images), 3, 32, 32)  # half the synthetic 64 px side: boxes scale by 2

    def detect(self, pixels, labels):
        import torch

        results = []
        for objects in self.answers[self.calls:self.calls + len(pixels)]:
            kept = [obj for obj in objects if obj["name"] not in self.blind_to]
            boxes = torch.tensor([[v / 2 for v in obj["box"]] for obj in kept]).reshape(-1, 4)
            results.append({"boxes": boxes, "scores": torch.ones(len(kept)),
                            "labels": torch.tensor([labels.index(obj["name"]) for obj in kept], dtype=torch.long)})
        self.calls += len(pixels)
        return results


@pytest.fixture(scope="module")
def detection_data(tmp_path_factory):
    from vlmkit.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth-det")
    generate(out, n=50, seed=3, image_size=64, holdout=["red triangle"], progress=False)
    return out


def test_eval_detection_base_and_novel(detection_data, capsys):
    from vlmkit.data.formats import read_records
    from vlmkit.tasks.detection import evaluate_detection, holdout_of

    records = read_records(detection_data / "test.jsonl")
    assert holdout_of(detection_data / "test.jsonl") == ["red triangle"]
    perfect = evaluate_detection(_Detector(records), records, novel=["red triangle"], batch_size=5)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["novel"]["AP"] == pytest.approx(1.0)
    blind = evaluate_detection(_Detector(records, blind_to=["red triangle"]), records, novel=["red triangle"])
    assert blind["base"]["AP"] == pytest.approx(1.0) and blind["novel"]["AP"] == 0.0
    assert blind["per_category"]["red triangle"] == 0.0 and "red triangle" in blind["novel_classes"]


def test_eval_detection_refuses_bad_boxes_and_non_detectors(detection_data, tmp_path):
    from vlmkit.data.formats import read_records
    from vlmkit.tasks.detection import evaluate_detection

    records = read_records(detection_data / "test.jsonl")
    bad = [dict(record) for record in records[:3]]
    bad[1]["objects"] = [{"name": "red circle", "box": [10, 10, 10, 20]}]
    with pytest.raises(UserError, match="zero area"):
        evaluate_detection(_Detector(bad), bad)
    bad[1]["objects"] = [{"name": "red circle", "box": [10, 10, 70, 20]}]
    with pytest.raises(UserError, match="outside the 64x64 image"):
        evaluate_detection(_Detector(bad), bad)

    class Blind:
        capabilities = ()
        family = "blind"
    with pytest.raises(UserError, match="cannot 'detect objects'"):
        evaluate_detection(Blind(), records)
