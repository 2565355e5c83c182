"""Linear probe: multinomial logistic regression on frozen image features (CLIP paper protocol).

The L2 strength is chosen on a held-out fifth of the training features, then the classifier is
refit on all of them. Solved with L-BFGS in torch (no scikit-learn needed).
"""
from __future__ import annotations

from vlmkit.capabilities import EmbedsImages

from typing import Sequence

import torch
import torch.nn.functional as F

from vlmkit.errors import UserError

L2_CANDIDATES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_logistic_regression(features: torch.Tensor, targets: torch.Tensor, num_classes: int, l2: float, max_iter: int = 200) -> torch.nn.Linear:
    """Softmax regression minimising mean cross-entropy + l2 * ||W||^2 with L-BFGS."""
    torch.manual_seed(0)
    classifier = torch.nn.Linear(features.shape[1], num_classes)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), targets) + l2 * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return classifier


def _labels(records: Sequence[dict], label_key: str, where: str) -> list[dict]:
    labelled = [record for record in records if record.get(label_key) is not None]
    if not labelled:
        raise UserError(f"no record in {where} has a '{label_key}' field; choose it with --label-key")
    return labelled


def evaluate_linear_probe(model, train_records: Sequence[dict], test_records: Sequence[dict], label_key: str = "label") -> dict:
    """Top-1 accuracy of a logistic-regression probe on the model's normalised image embeddings."""
    model.require(EmbedsImages, task="linear probe")
    train_records = _labels(train_records, label_key, "--train")
    test_records = _labels(test_records, label_key, "--test")
    classnames = sorted({str(record[label_key]) for record in train_records})
    unseen = sorted({str(record[label_key]) for record in test_records} - set(classnames))
    if unseen:
        raise UserError(f"test labels {unseen[:5]} never occur in --train; a probe can only predict trained classes")
    index = {name: position for position, name in enumerate(classnames)}
    train_x = model.embed_images([record["image"] for record in train_records])  # (N, D)
    train_y = torch.tensor([index[str(record[label_key])] for record in train_records])
    test_x = model.embed_images([record["image"] for record in test_records])
    test_y = torch.tensor([index[str(record[label_key])] for record in test_records])

    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_y), generator=generator)
    cut = max(1, len(order) // 5)
    held, fit = order[:cut], order[cut:]
    best_l2, best_accuracy = L2_CANDIDATES[0], -1.0
    if len(fit) > 0:
        for l2 in L2_CANDIDATES:
            classifier = fit_logistic_regression(train_x[fit], train_y[fit], len(classnames), l2)
            with torch.no_grad():
                accuracy = (classifier(train_x[held]).argmax(1) == train_y[held]).float().mean().item()
            if accuracy > best_accuracy:
                best_l2, best_accuracy = l2, accuracy
    classifier = fit_logistic_regression(train_x, train_y, len(classnames), best_l2)
    with torch.no_grad():
        predictions = classifier(test_x).argmax(1)
    return {
        "top1": (predictions == test_y).float().mean().item(),
        "l2": best_l2,
        "n_train": len(train_records),
        "n_test": len(test_records),
        "classes": len(classnames),
    }
