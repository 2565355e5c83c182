"""Averaged copies of weights: BLIP's momentum encoders, GLIDE's moving average of its weights.

Both keep a copy of some modules that is never trained and, after each optimizer step, move it towards the
trained weights: `copy <- decay * copy + (1 - decay) * trained`. The helpers here pair the tensors by name
and do that update (and a plain copy) with one fused call over all of them.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def paired_parameters(modules: Iterable[tuple[nn.Module, nn.Module]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each (trained module, its copy): the trained parameters and the copy's, matched by name. The copy
    may hold fewer parameters than the module (BLIP's momentum text stack has no cross-attention); a name the
    module lacks is a KeyError."""
    trained, copies = [], []
    for module, copy in modules:
        params = dict(module.named_parameters())
        for name, param in copy.named_parameters():
            trained.append(params[name])
            copies.append(param)
    return trained, copies


@torch.no_grad()
def update_moving_average(copies: list[torch.Tensor], trained: list[torch.Tensor], decay: float) -> None:
    """copies <- decay * copies + (1 - decay) * trained, in place, for every pair at once."""
    torch._foreach_mul_(copies, decay)
    torch._foreach_add_(copies, trained, alpha=1 - decay)


@torch.no_grad()
def copy_weights(copies: list[torch.Tensor], trained: list[torch.Tensor]) -> None:
    """copies <- trained, in place (a copy starts, or restarts, from the trained weights)."""
    torch._foreach_copy_(copies, trained)
