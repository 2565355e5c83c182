"""A model's count of optimizer updates, kept with its weights.

A loss whose form changes after N updates (VSE++'s warm-up on summed negatives before the hardest one)
reads the count here. It is a persistent buffer, so it is saved in every checkpoint and a resumed run
continues the schedule where it stopped; the trainer's `after_optimizer_step` hook advances it.
"""
from __future__ import annotations

import torch
from torch import nn


class UpdateCounter(nn.Module):
    # a checkpoint written before a family counted its updates loads with the count at 0 (vlmkit.io)
    optional_state = {"count": torch.zeros((), dtype=torch.long)}

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def step(self) -> None:
        """One more optimizer update."""
        self.count += 1

    def reached(self, updates: int) -> bool:
        """True once at least `updates` updates have been taken."""
        return int(self.count) >= updates
