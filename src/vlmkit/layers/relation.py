"""A Relation Network readout (Santoro et al., 2017) over a set of items with 2D positions.

g(a_i, a_j, p_i - p_j) for every ordered pair of real items, max-pooled, then projected: it makes
"compare the positions of two items, as the context asks" a single MLP's job instead of something
attention must assemble across layers. The first layer is factorised (W_a a_i + W_b a_j + W_p d_ij)
so pairs cost O(L^2 * hidden) rather than O(L^2 * width * hidden).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PairwiseRelation(nn.Module):
    """items (B, L, D), positions (B, L, 2), real (B, L) bool -> (B, out_dim)."""

    def __init__(self, dim: int, hidden: int = 64, out_dim: int | None = None) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(dim, hidden), nn.Linear(dim, hidden, bias=False)
        self.offset = nn.Linear(2, hidden, bias=False)
        self.pair = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, out_dim or dim)

    def forward(self, items: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        offsets = positions[:, :, None] - positions[:, None, :]  # (B, L, L, 2): p_i - p_j
        hidden = self.first(items)[:, :, None] + self.second(items)[:, None, :] + self.offset(offsets)  # (B, L, L, H)
        hidden = F.relu(self.pair(F.relu(hidden)))  # (B, L, L, H)
        pairs = real[:, :, None] & real[:, None, :]  # (B, L, L)
        # Max, not the paper's sum/mean: one relevant pair among ~L^2 is not averaged away.
        pooled = hidden.masked_fill(~pairs[..., None], float("-inf")).flatten(1, 2).amax(dim=1)  # (B, H)
        return self.out(pooled.clamp(min=0))  # (B, out_dim); clamp: a row with no real pair gives 0, not -inf
