"""Contrastive and sigmoid losses: definitions, and two gloo processes == one process."""
import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlmkit.losses import contrastive_loss, sigmoid_loss, unicl_loss


def _features(seed=0, batch=8, dim=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)


def test_contrastive_loss_matches_clip_definition():
    image, text = _features()
    scale = torch.tensor(math.log(1 / 0.07))
    loss, _ = contrastive_loss(image, text, scale)
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(8)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(loss, want, atol=1e-6)


def test_sigmoid_loss_matches_siglip_definition():
    image, text = _features()
    scale, bias = torch.tensor(math.log(10)), torch.tensor(-10.0)
    loss, _ = sigmoid_loss(image, text, scale, bias)
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T + bias
    labels = 2 * torch.eye(8) - 1
    want = -F.logsigmoid(labels * logits).sum() / 8
    assert torch.allclose(loss, want, atol=1e-5)


def test_unicl_with_distinct_labels_is_the_clip_loss():
    image, text = _features()
    scale = torch.tensor(math.log(1 / 0.07))
    unicl, logits = unicl_loss(image, text, scale, torch.arange(8) * 3)
    clip, clip_logits = contrastive_loss(image, text, scale)
    assert torch.equal(logits, clip_logits)
    assert torch.allclose(unicl, clip, atol=1e-6, rtol=0)


def test_unicl_hand_computed_three_by_three():
    # Unit features at angles chosen so the cosines are simple: logits = scale * cos, scale = 1.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([7, 7, 2])  # pairs 0 and 1 share a label; pair 2 is its own class
    loss, _ = unicl_loss(image, text, torch.tensor(0.0), labels)
    r = 1 / math.sqrt(2)
    cos = [[1, r, 0], [0, r, 1], [r, 1, r]]  # image i against text j
    def log_softmax(row, j):
        return row[j] - math.log(sum(math.exp(v) for v in row))
    columns = [[cos[i][j] for i in range(3)] for j in range(3)]  # text j against image i
    # Rows 0 and 1 average over the two texts (images) labelled 7; row 2 has only its own pair.
    i2t = -(0.5 * (log_softmax(cos[0], 0) + log_softmax(cos[0], 1)) + 0.5 * (log_softmax(cos[1], 0) + log_softmax(cos[1], 1))
            + log_softmax(cos[2], 2)) / 3
    t2i = -(0.5 * (log_softmax(columns[0], 0) + log_softmax(columns[0], 1))
            + 0.5 * (log_softmax(columns[1], 0) + log_softmax(columns[1], 1)) + log_softmax(columns[2], 2)) / 3
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert not math.isclose(loss.item(), contrastive_loss(image, text, torch.tensor(0.0))[0].item(), abs_tol=1e-3)


def _worker(rank, world, init_file, out_dir, kind, local_loss):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    image, text = _features()
    rows = slice(rank * 4, rank * 4 + 4)
    image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
    scale = torch.tensor(math.log(10) if kind == "sigmoid" else math.log(1 / 0.07))
    if kind == "contrastive":
        loss, _ = contrastive_loss(image, text, scale, local_loss=local_loss)
    elif kind == "negclip":
        negatives = _negatives()[rows].clone().requires_grad_()
        loss, _ = contrastive_loss(image, text, scale, local_loss=local_loss, negative_features=negatives,
                                   negative_mask=_NEGATIVE_MASK[rows])
    elif kind == "unicl":
        loss, _ = unicl_loss(image, text, scale, _UNICL_LABELS[rows])
    else:
        loss, _ = sigmoid_loss(image, text, scale, torch.tensor(-10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


_UNICL_LABELS = torch.tensor([0, 1, 0, 9, 8, 1, 7, 0])  # classes shared within and across the two ranks
_NEGATIVE_MASK = torch.tensor([True, True, False, True, True, True, False, True])  # rows 2 and 6 have none


def _negatives():
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind,local_loss", [("contrastive", True), ("contrastive", False), ("sigmoid", True), ("unicl", True),
                                             ("negclip", True), ("negclip", False)])
def test_two_processes_equal_one(kind, local_loss):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, kind, local_loss), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    image, text = _features()
    image.requires_grad_(), text.requires_grad_()
    if kind == "contrastive":
        loss, _ = contrastive_loss(image, text, torch.tensor(math.log(1 / 0.07)))
    elif kind == "negclip":
        loss, _ = contrastive_loss(image, text, torch.tensor(math.log(1 / 0.07)), negative_features=_negatives(),
                                   negative_mask=_NEGATIVE_MASK)
    elif kind == "unicl":
        loss, _ = unicl_loss(image, text, torch.tensor(math.log(1 / 0.07)), _UNICL_LABELS)
    else:
        loss, _ = sigmoid_loss(image, text, torch.tensor(math.log(10)), torch.tensor(-10.0))
    loss.backward()
    # DDP averages gradients over ranks: the mean of the rank losses and rank gradients / world.
    mean_loss = sum(r["loss"] for r in ranks) / 2
    assert torch.allclose(mean_loss, loss.detach(), atol=1e-5)
    image_grad = torch.cat([r["image_grad"] for r in ranks]) / 2
    text_grad = torch.cat([r["text_grad"] for r in ranks]) / 2
    assert torch.allclose(image_grad, image.grad, atol=1e-6)
    assert torch.allclose(text_grad, text.grad, atol=1e-6)


def test_clip_family_trains_with_unicl_labels_from_the_records():
    import vlmkit
    from vlmkit.models.clip import _LabelledDataset

    model = vlmkit.create_model("clip-tiny", loss="unicl")
    batch = model.dummy_batch(4)
    assert batch["labels"].tolist() == [0, 0, 1, 1]
    output = model(batch)
    output.loss.backward()
    assert torch.isfinite(output.loss) and model.logit_scale.grad is not None

    class Records:  # the part of an ImageTextDataset the wrapper reads
        records = [{"label": "red circle"}, {}, {"label": "blue star"}, {"label": "red circle"}, {}]

        def collate(self, samples):
            return {"indices": torch.tensor(samples)}

    labels = _LabelledDataset(Records()).collate([0, 1, 2, 3, 4])["labels"].tolist()
    assert labels[0] == labels[3] and len(set(labels)) == 4  # unlabelled records are classes of their own


def test_negclip_loss_adds_hard_negative_columns_to_the_image_side_only():
    image, text = _features()
    negatives, mask = _negatives(), _NEGATIVE_MASK
    scale = torch.tensor(math.log(1 / 0.07))
    loss, logits = contrastive_loss(image, text, scale, negative_features=negatives, negative_mask=mask)
    image, text, negatives = (F.normalize(x, dim=-1) for x in (image, text, negatives))
    per_image = scale.exp() * image @ text.T  # (8, 8)
    labels = torch.arange(8)
    assert torch.allclose(logits, per_image, atol=1e-6)  # what the accuracy log reads: the real texts only
    with_negatives = torch.cat([per_image, (scale.exp() * image @ negatives.T)[:, mask]], dim=1)  # (8, 8 + 6)
    want = (F.cross_entropy(with_negatives, labels) + F.cross_entropy(per_image.T, labels)) / 2
    assert torch.allclose(loss, want, atol=1e-6)
    plain, _ = contrastive_loss(image, text, scale)
    assert loss > plain  # more columns to beat on the image side


def test_clip_family_trains_with_hard_negatives_drawn_per_sample():
    import random

    import vlmkit
    from vlmkit.data.negatives import hard_negative
    from vlmkit.errors import UserError
    from vlmkit.models.clip import CLIPTraining, _HardNegativeDataset

    class Captions:  # the part of an ImageTextDataset the wrapper reads
        seed, epoch = 3, 0

        @staticmethod
        def tokenizer(texts):
            return [[len(text), 1] for text in texts]

        def collate(self, samples):
            return {"indices": torch.tensor([i for i, _ in samples]), "texts": [t for _, t in samples]}

    dataset = _HardNegativeDataset(Captions(), ("spatial", "swap"))
    captions = [(0, "a red star left of a blue circle"), (1, "star"), (2, "a green square on the right")]
    batch = dataset.collate(captions)
    assert batch["has_negative"].tolist() == [True, False, True]
    assert batch["negative_tokens"].shape == (3, 2)
    assert dataset.collate(captions)["negative_tokens"].tolist() == batch["negative_tokens"].tolist()  # seeded per sample
    with pytest.raises(UserError, match="label_smoothing"):
        CLIPTraining(hard_negatives=("spatial",), label_smoothing=0.1)
    with pytest.raises(UserError, match="kinds"):
        CLIPTraining(hard_negatives=("verbs",))

    model = vlmkit.create_model("clip-tiny")
    batch = model.dummy_batch(4)
    batch["negative_tokens"], batch["has_negative"] = batch["tokens"].flip(1), torch.tensor([True, True, False, True])
    output = model(batch)
    output.loss.backward()
    assert torch.isfinite(output.loss) and 0 <= output.logs["negative_acc"] <= 1
    assert hard_negative("a red star", random.Random(0), ("spatial",)) is None
