"""VSE++: the max-of-hinges loss against its definition, written out pair by pair."""
import pytest
import torch
import torch.nn.functional as F

from vlmkit.losses import hinge_triplet_loss


def _by_definition(images, texts, margin, hardest):
    images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    s = lambda i, j: float(images[i] @ texts[j])  # noqa: E731
    batch, total = images.shape[0], 0.0
    for i in range(batch):
        wrong_texts = [max(0.0, margin - s(i, i) + s(i, j)) for j in range(batch) if j != i]
        wrong_images = [max(0.0, margin - s(i, i) + s(j, i)) for j in range(batch) if j != i]
        total += (max(wrong_texts) + max(wrong_images)) if hardest else (sum(wrong_texts) + sum(wrong_images))
    return total


@pytest.mark.parametrize("hardest", [True, False])
def test_hinge_loss_equals_its_definition(hardest):
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    loss, scores = hinge_triplet_loss(images, texts, margin=0.2, hardest=hardest)
    assert loss.item() == pytest.approx(_by_definition(images, texts, 0.2, hardest), rel=1e-5)
    assert scores.shape == (5, 5)


def test_pairs_beating_every_negative_by_the_margin_cost_nothing():
    embeddings = torch.eye(4) * 3  # orthogonal: s(i, i) = 1, s(i, j) = 0
    loss, _ = hinge_triplet_loss(embeddings, embeddings, margin=0.5)
    assert loss.item() == 0.0
    loss, _ = hinge_triplet_loss(embeddings, embeddings, margin=1.5)  # now every hardest negative is 0.5 short
    assert loss.item() == pytest.approx(4 * 0.5 * 2)
