"""Patch embedding helpers: position-grid resampling for other image sizes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_grid_positions(positions: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resample the (old_h*old_w) grid part of a (prefix + N, D) position table.

    The class-token rows are kept as they are; used when a model runs at an image size other
    than the one it was trained at (and when loading checkpoints of another resolution).
    """
    prefix, grid = positions[:num_prefix_tokens], positions[num_prefix_tokens:]
    old = int(math.isqrt(grid.shape[0]))
    if (old, old) == tuple(new_grid):
        return positions
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(positions.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], dim)  # (N', D)
    return torch.cat([prefix, grid], dim=0)
