"""Zero-shot classification scores (CLIP_benchmark protocol) as a pure function of logits."""
from __future__ import annotations

import numpy as np

from vlmkit.errors import UserError
from vlmkit.metrics.retrieval import _as_numpy


def zeroshot_scores(logits, labels) -> dict:
    """Top-1, top-5 accuracy and mean per-class recall for (n_samples, n_classes) logits.

    "top5" is NaN when there are fewer than 5 classes. Mean per-class recall averages the
    recall of the classes present in `labels` (CLIP_benchmark's balanced accuracy).
    """
    scores = _as_numpy(logits).astype(np.float64)
    target = _as_numpy(labels).astype(np.int64).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != len(target):
        raise UserError(f"logits must be (n_samples, n_classes) with n_samples = len(labels) = {len(target)}, "
                        f"got shape {tuple(scores.shape)}")
    n_classes = scores.shape[1]
    if len(target) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_per_class_recall": float("nan")}
    if target.min() < 0 or target.max() >= n_classes:
        raise UserError(f"labels must lie in [0, {n_classes}); fix the label indices")
    ranking = np.argsort(-scores, axis=1, kind="stable")
    top1 = ranking[:, 0] == target
    result = {"top1": float(top1.mean())}
    result["top5"] = float((ranking[:, :5] == target[:, None]).any(axis=1).mean()) if n_classes >= 5 else float("nan")
    present = np.unique(target)
    hits = np.bincount(target[top1], minlength=n_classes)
    totals = np.bincount(target, minlength=n_classes)
    result["mean_per_class_recall"] = float((hits[present] / totals[present]).mean())
    return result
