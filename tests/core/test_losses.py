"""Contrastive and sigmoid losses: definitions, and two gloo processes == one process."""
import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlmkit.losses import contrastive_loss, sigmoid_loss


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


def _worker(rank, world, init_file, out_dir, kind, local_loss):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    image, text = _features()
    rows = slice(rank * 4, rank * 4 + 4)
    image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07) if kind == "contrastive" else math.log(10))
    if kind == "contrastive":
        loss, _ = contrastive_loss(image, text, scale, local_loss=local_loss)
    else:
        loss, _ = sigmoid_loss(image, text, scale, torch.tensor(-10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("kind,local_loss", [("contrastive", True), ("contrastive", False), ("sigmoid", True)])
def test_two_processes_equal_one(kind, local_loss):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, kind, local_loss), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    image, text = _features()
    image.requires_grad_(), text.requires_grad_()
    if kind == "contrastive":
        loss, _ = contrastive_loss(image, text, torch.tensor(math.log(1 / 0.07)))
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
