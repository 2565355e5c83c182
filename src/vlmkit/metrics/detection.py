"""COCO box AP, computed exactly as pycocotools' `COCOeval` (iouType "bbox") computes it.

Same IoU thresholds (.50:.05:.95), the same 101 recall points with the monotone precision
envelope, maxDets (1, 10, 100), the four area ranges, the same greedy matching (score order,
stable sorts, ignored and crowd ground truth last) and the same empty cases (-1 where a
category or area has no ground truth). pycocotools is only used by the parity test; this module
is pure numpy.

Boxes are COCO's `[x, y, width, height]` in pixels; `xyxy_to_xywh` converts the
`[x0, y0, x1, y1]` boxes that vlmkit's records and detectors use.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from vlmkit.errors import UserError

# pycocotools Params.setDetParams, written with the same expressions so the floats are identical.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETECTIONS = (1, 10, 100)
AREA_RANGES = {"all": (0 ** 2, 1e5 ** 2), "small": (0 ** 2, 32 ** 2),
               "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e5 ** 2)}


def xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    """`[x0, y0, x1, y1]` -> COCO's `[x, y, width, height]`."""
    x0, y0, x1, y1 = (float(value) for value in box)
    return [x0, y0, x1 - x0, y1 - y0]


def box_iou_xywh(detections: np.ndarray, ground_truth: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of COCO boxes as pycocotools' C `bbIou`: a crowd ground truth divides by the
    detection's area only (so a detection inside a crowd region scores 1)."""
    dx, dy, dw, dh = (detections[:, i:i + 1] for i in range(4))           # (D, 1) each
    gx, gy, gw, gh = (ground_truth[None, :, i] for i in range(4))         # (1, G) each
    width = np.minimum(dx + dw, gx + gw) - np.maximum(dx, gx)
    height = np.minimum(dy + dh, gy + gh) - np.maximum(dy, gy)
    inter = np.where((width > 0) & (height > 0), width * height, 0.0)
    union = np.where(crowd[None, :], dw * dh, dw * dh + gw * gh - inter)
    return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _evaluate_image(gts: list[dict], dts: list[dict], ious: np.ndarray, area: tuple[float, float],
                    max_det: int) -> dict | None:
    """pycocotools `COCOeval.evaluateImg` for one image, one category, one area range."""
    if not gts and not dts:
        return None
    gt_ignore_raw = [1 if (g["ignore"] or g["area"] < area[0] or g["area"] > area[1]) else 0 for g in gts]
    gt_order = np.argsort(gt_ignore_raw, kind="mergesort")
    gts = [gts[i] for i in gt_order]
    dt_order = np.argsort([-d["score"] for d in dts], kind="mergesort")
    dts = [dts[i] for i in dt_order[0:max_det]]
    crowd = [int(g["iscrowd"]) for g in gts]
    if len(ious) > 0:
        ious = ious[:, gt_order]
    T, G, D = len(IOU_THRESHOLDS), len(gts), len(dts)
    gt_matches = np.zeros((T, G))
    dt_matches = np.zeros((T, D))
    gt_ignore = np.array([gt_ignore_raw[i] for i in gt_order])
    dt_ignore = np.zeros((T, D))
    if len(ious) != 0:
        for t_index, threshold in enumerate(IOU_THRESHOLDS):
            for d_index, det in enumerate(dts):
                best = min([threshold, 1 - 1e-10])
                match = -1
                for g_index in range(G):
                    # a matched, non-crowd ground truth is taken
                    if gt_matches[t_index, g_index] > 0 and not crowd[g_index]:
                        continue
                    # already matched a regular ground truth; the rest are ignored ones: stop
                    if match > -1 and gt_ignore[match] == 0 and gt_ignore[g_index] == 1:
                        break
                    if ious[d_index, g_index] < best:
                        continue
                    best = ious[d_index, g_index]
                    match = g_index
                if match == -1:
                    continue
                dt_ignore[t_index, d_index] = gt_ignore[match]
                dt_matches[t_index, d_index] = gts[match]["id"]
                gt_matches[t_index, match] = det["id"]
    outside = np.array([d["area"] < area[0] or d["area"] > area[1] for d in dts]).reshape((1, D))
    dt_ignore = np.logical_or(dt_ignore, np.logical_and(dt_matches == 0, np.repeat(outside, T, 0)))
    return {"dt_matches": dt_matches, "dt_scores": [d["score"] for d in dts],
            "gt_ignore": gt_ignore, "dt_ignore": dt_ignore}


def _check_box(box, where: str) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise UserError(f"{where} has a box that is not 4 numbers [x, y, width, height]; fix it")
    return [float(value) for value in box]


def coco_box_ap(ground_truth: Sequence[Iterable[dict]], detections: Sequence[Iterable[dict]],
                categories: Sequence[int] | None = None, groups: dict[str, Sequence[int]] | None = None) -> dict:
    """COCO box AP of `detections` against `ground_truth`, as pycocotools computes it.

    Both are one list per image: ground truth `{"bbox": [x, y, w, h], "category": int}` (optional
    `"iscrowd"`, `"ignore"`, `"area"`: defaults 0, 0, w*h), detections
    `{"bbox", "category", "score"}`. `categories` are the category ids evaluated (default: those
    of the ground truth, as COCO's category list); detections of other categories are ignored.
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
    "ARl"} (COCOeval.stats, -1 where nothing can be scored) and "per_category": {id: AP or None
    where the category has no ground truth}. Values are fractions in [0, 1]. `groups` ({name:
    category ids}) adds {name: {"AP", "AP50", "AP75"}} over those categories alone (what COCOeval
    with `params.catIds` set to them gives; None for an empty group), from the same matching.
    """
    if len(ground_truth) != len(detections):
        raise UserError(f"box AP needs one detection list per image: {len(ground_truth)} ground-truth images, "
                        f"{len(detections)} detection lists")
    gts: dict[tuple[int, int], list[dict]] = {}
    dts: dict[tuple[int, int], list[dict]] = {}
    next_gt_id = 1
    for image, objects in enumerate(ground_truth):
        for obj in objects:
            box = _check_box(obj["bbox"], f"ground truth of image {image}")
            crowd = int(obj.get("iscrowd", 0))
            gts.setdefault((image, int(obj["category"])), []).append({
                "bbox": box, "area": float(obj.get("area", box[2] * box[3])), "iscrowd": crowd,
                "ignore": 1 if (obj.get("ignore", 0) or crowd) else 0, "id": next_gt_id})
            next_gt_id += 1
    next_dt_id = 1
    for image, found in enumerate(detections):
        for det in found:
            box = _check_box(det["bbox"], f"detections of image {image}")
            dts.setdefault((image, int(det["category"])), []).append({
                "bbox": box, "area": box[2] * box[3], "score": float(det["score"]), "id": next_dt_id})
            next_dt_id += 1
    category_ids = sorted(set(categories) if categories is not None else {cat for _, cat in gts})
    num_images = len(ground_truth)
    areas = list(AREA_RANGES.values())

    # computeIoU: detections in score order, cut at the largest maxDets
    ious: dict[tuple[int, int], np.ndarray] = {}
    for image in range(num_images):
        for cat in category_ids:
            gt, dt = gts.get((image, cat), []), dts.get((image, cat), [])
            if not gt or not dt:
                ious[image, cat] = np.zeros((0,))
                continue
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in order][0:MAX_DETECTIONS[-1]]
            ious[image, cat] = box_iou_xywh(np.array([d["bbox"] for d in dt], dtype=np.float64),
                                            np.array([g["bbox"] for g in gt], dtype=np.float64),
                                            np.array([bool(g["iscrowd"]) for g in gt]))

    # evaluate + accumulate
    T, R, K, A, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(category_ids), len(areas), len(MAX_DETECTIONS)
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    for k, cat in enumerate(category_ids):
        for a, area in enumerate(areas):
            evaluated = [_evaluate_image(gts.get((image, cat), []), dts.get((image, cat), []), ious[image, cat],
                                         area, MAX_DETECTIONS[-1]) for image in range(num_images)]
            evaluated = [e for e in evaluated if e is not None]
            if not evaluated:
                continue
            for m, max_det in enumerate(MAX_DETECTIONS):
                scores = np.concatenate([e["dt_scores"][0:max_det] for e in evaluated])
                order = np.argsort(-scores, kind="mergesort")
                dt_matches = np.concatenate([e["dt_matches"][:, 0:max_det] for e in evaluated], axis=1)[:, order]
                dt_ignore = np.concatenate([e["dt_ignore"][:, 0:max_det] for e in evaluated], axis=1)[:, order]
                gt_ignore = np.concatenate([e["gt_ignore"] for e in evaluated])
                num_positive = np.count_nonzero(gt_ignore == 0)
                if num_positive == 0:
                    continue
                tps = np.logical_and(dt_matches, np.logical_not(dt_ignore))
                fps = np.logical_and(np.logical_not(dt_matches), np.logical_not(dt_ignore))
                tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
                fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
                for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum)):
                    num_det = len(tp)
                    rc = tp / num_positive
                    pr = (tp / (fp + tp + np.spacing(1))).tolist()
                    recall[t, k, a, m] = rc[-1] if num_det else 0
                    for i in range(num_det - 1, 0, -1):  # precision envelope, right to left
                        if pr[i] > pr[i - 1]:
                            pr[i - 1] = pr[i]
                    q = np.zeros((R,))
                    # recall points beyond the last detection's recall keep precision 0
                    for r, index in enumerate(np.searchsorted(rc, RECALL_THRESHOLDS, side="left")):
                        if index >= num_det:
                            break
                        q[r] = pr[index]
                    precision[t, :, k, a, m] = q

    def summarize(ap: bool, iou: float | None = None, area: str = "all", max_det: int = 100,
                  members: list[int] | None = None) -> float:
        a = list(AREA_RANGES).index(area)
        m = MAX_DETECTIONS.index(max_det)
        ks = list(range(K)) if members is None else members
        if ap:
            values = precision if iou is None else precision[np.where(iou == IOU_THRESHOLDS)[0]]
            values = values[:, :, ks, a, m]
        else:
            values = recall if iou is None else recall[np.where(iou == IOU_THRESHOLDS)[0]]
            values = values[:, ks, a, m]
        valid = values[values > -1]
        return -1.0 if len(valid) == 0 else float(np.mean(valid))

    stats = {"AP": summarize(True), "AP50": summarize(True, .5), "AP75": summarize(True, .75),
             "APs": summarize(True, area="small"), "APm": summarize(True, area="medium"),
             "APl": summarize(True, area="large"), "AR1": summarize(False, max_det=1),
             "AR10": summarize(False, max_det=10), "AR100": summarize(False),
             "ARs": summarize(False, area="small"), "ARm": summarize(False, area="medium"),
             "ARl": summarize(False, area="large")}
    per_category = {}
    for k, cat in enumerate(category_ids):
        values = precision[:, :, k, 0, -1]
        valid = values[values > -1]
        per_category[cat] = None if len(valid) == 0 else float(np.mean(valid))
    stats["per_category"] = per_category
    for name, members in (groups or {}).items():
        indices = [category_ids.index(cat) for cat in members if cat in category_ids]
        stats[name] = {"AP": summarize(True, members=indices), "AP50": summarize(True, .5, members=indices),
                       "AP75": summarize(True, .75, members=indices)} if indices else None
    return stats
