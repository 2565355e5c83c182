"""recall@K and zero-shot scores against straightforward loop implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmkit.metrics.classification import zeroshot_scores
from vlmkit.metrics.retrieval import recall_at_k


def _loop_recall(scores, owner, ks):
    n_images, n_texts = scores.shape
    out = {}
    for k in ks:
        hits = 0
        for image in range(n_images):
            top = np.argsort(-scores[image], kind="stable")[:k]
            hits += any(owner[t] == image for t in top)
        out[f"i2t_r{k}"] = hits / n_images
    for k in ks:
        hits = 0
        for text in range(n_texts):
            top = np.argsort(-scores[:, text], kind="stable")[:k]
            hits += owner[text] in top
        out[f"t2i_r{k}"] = hits / n_texts
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_loop_with_several_captions_per_image(seed):
    rng = np.random.default_rng(seed)
    n_images, per_image = 40, 5
    owner = np.repeat(np.arange(n_images), per_image)
    rng.shuffle(owner)
    scores = rng.normal(size=(n_images, len(owner)))
    scores[owner, np.arange(len(owner))] += 1.5  # make the task non-trivial but imperfect
    ours = recall_at_k(torch.from_numpy(scores), torch.from_numpy(owner), ks=(1, 5, 10))
    expected = _loop_recall(scores, owner, (1, 5, 10))
    assert list(ours) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value)
        assert isinstance(ours[key], float)
    assert 0.05 < ours["t2i_r1"] < 0.95


def test_perfect_retrieval_is_one():
    scores = np.eye(4)
    assert set(recall_at_k(scores, np.arange(4), ks=(1,)).values()) == {1.0}


def test_zeroshot_scores_against_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10))
    labels = rng.integers(0, 10, size=200)
    logits[np.arange(200), labels] += 1.0
    ours = zeroshot_scores(torch.from_numpy(logits), labels)
    predicted = logits.argmax(1)
    top5 = np.argsort(-logits, 1)[:, :5]
    assert ours["top1"] == pytest.approx((predicted == labels).mean())
    assert ours["top5"] == pytest.approx(np.mean([labels[i] in top5[i] for i in range(200)]))
    recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
    assert ours["mean_per_class_recall"] == pytest.approx(np.mean(recalls))


def test_top5_is_nan_with_fewer_than_five_classes():
    result = zeroshot_scores(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]))
    assert math.isnan(result["top5"]) and result["top1"] == 0.5 and result["mean_per_class_recall"] == 0.5
