"""Patch embedding: the ViT patchify as one matmul, and position-grid resampling for other image sizes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbedding(nn.Conv2d):
    """The ViT patchify, a convolution with kernel = stride = `patch`, computed as one matmul over the patches.

    It is `nn.Conv2d(in_channels, width, patch, stride=patch)`: the same parameters, state-dict keys and
    output (B, width, H // p, W // p), rows and columns past the last whole patch dropped as the
    convolution drops them; only the arithmetic differs (float rounding, ~1e-6). Why not the convolution:
    on CPU a strided conv goes to oneDNN, which builds and keeps a primitive for every new input shape
    (measured: 2 MB of native memory for 40 new batch sizes at 64 px / patch 8, so a server that sees
    many batch sizes grows), and the matmul is about as fast there: 0.5-0.9x the convolution's time
    forward + backward, 0.7-1.05x forward only (64 px / patch 8 to 336 px / patch 14, one thread).
    """

    def __init__(self, in_channels: int, width: int, patch: int, bias: bool = False) -> None:
        super().__init__(in_channels, width, patch, stride=patch, bias=bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, width, gh, gw), a view of the (B, gh * gw, width) matmul result."""
        b, c, h, w = pixels.shape
        p = self.kernel_size[0]
        gh, gw = h // p, w // p
        patches = pixels[:, :, :gh * p, :gw * p].reshape(b, c, gh, p, gw, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)  # (B, N, C*p*p), (c, i, j) order
        tokens = F.linear(patches, self.weight.flatten(1), self.bias)  # (B, N, width)
        return tokens.transpose(1, 2).unflatten(2, (gh, gw))


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
