"""Optimizer groups and the learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on gains, biases, embeddings of rank < 2 and the logit scale/bias (OpenCLIP)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or "logit_scale" in name or "logit_bias" in name or "norm" in name or name.endswith(".bias"):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to `base_lr`, then cosine decay to `min_lr` at `total_steps` (step counts from 0)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# Devices where torch's AdamW has a fused kernel (torch >= 2.4 for the CPU one).
FUSED_ADAMW_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps"})


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups`, with torch's fused kernel where the parameters' device has one.

    Fused, one kernel updates every parameter; unfused, AdamW loops over the tensors with ~10 ops
    each. On CPU that is 18.6 against 3.6 ms a step for a 3M-parameter LM (one thread), ~7% of its
    training step. HF's Trainer defaults to the same kernel (`adamw_torch_fused`).
    """
    devices = {parameter.device.type for parameter in model.parameters() if parameter.requires_grad}
    fused = bool(devices) and devices <= FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None)
