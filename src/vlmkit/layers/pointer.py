"""Soft-argmax pointing: where on an image grid each query attends, as (x, y) coordinates.

Each query scores every grid cell (a dot product of projections); the softmax over cells weights
the cells' centre coordinates, giving a differentiable position in [0, 1]^2 (x right, y down).
Used to ground text tokens in image patches: a box-centre loss trains it directly, and the
positions can be fed back into a model as features.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def grid_centres(grid_size: int) -> torch.Tensor:
    """(grid_size**2, 2) centres (x, y) in [0, 1] of a square grid's cells, in row-major order."""
    steps = (torch.arange(grid_size, dtype=torch.float) + 0.5) / grid_size
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


class SoftArgmaxPointer(nn.Module):
    """queries (B, L, Dq), grid tokens (B, G*G, Dk) row-major -> positions (B, L, 2), weights (B, L, G*G)."""

    def __init__(self, query_dim: int, key_dim: int, grid_size: int, dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Linear(query_dim, dim)
        self.key = nn.Linear(key_dim, dim)
        self.grid_size = grid_size  # centres are rebuilt per call: a buffer would stay on `meta` in from_pretrained

    def forward(self, queries: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self.query(queries), self.key(grid)  # (B, L, d), (B, N, d)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, L, N)
        centres = grid_centres(self.grid_size).to(weights.device, weights.dtype)  # (N, 2)
        return weights @ centres, weights  # (B, L, 2), (B, L, N)
