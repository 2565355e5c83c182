"""VSE++: the max-of-hinges loss against its definition, written out pair by pair; the warm-up on summed
negatives before the hardest (`training.hardest_after`) and its saved update count."""
import pytest
import torch
import torch.nn.functional as F

import vlmkit
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


def test_vsepp_sums_negatives_for_hardest_after_updates_then_takes_the_hardest(tmp_path):
    model = vlmkit.create_model("vsepp-tiny").eval()
    model.training_options = model.parse_training_options({"hardest_after": 1})
    batch = model.dummy_batch(4)
    with torch.no_grad():
        image, text = model.encode_image(batch["pixels"]), model.encode_text(batch["tokens"])
        summed, scores = hinge_triplet_loss(image, text, margin=0.2, hardest=False)
        hardest, _ = hinge_triplet_loss(image, text, margin=0.2, hardest=True)
        assert torch.allclose(scores, F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T, atol=1e-6)
        first = model(batch)
        model.after_optimizer_step()
        second = model(batch)
    assert torch.allclose(first.loss, summed) and float(first.logs["hardest"]) == 0.0
    assert torch.allclose(second.loss, hardest) and float(second.logs["hardest"]) == 1.0
    assert hardest <= summed
    model.save_pretrained(tmp_path / "run")
    assert int(vlmkit.load(tmp_path / "run").updates.count) == 1  # exact resume keeps the schedule's place


def test_a_run_saved_before_the_update_counter_still_loads(tmp_path):
    from vlmkit.io import load_safetensors, save_safetensors

    model = vlmkit.create_model("vsepp-tiny")
    model.save_pretrained(tmp_path / "run")
    state = load_safetensors(tmp_path / "run" / "model.safetensors")
    del state["updates.count"]  # what an earlier vlmkit wrote
    save_safetensors(state, tmp_path / "run" / "model.safetensors")
    loaded = vlmkit.load(tmp_path / "run")
    assert int(loaded.updates.count) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
