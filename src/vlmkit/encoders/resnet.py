"""CLIP's modified ResNet: 3-conv stem, anti-aliased bottlenecks, attention pooling.

pixels (B, 3, H, W) -> stem (stride 4) -> layer1..4 (stride 32 total) -> grid (B, C, h, w)
-> attention pool (mean token + positions attends over the grid) -> (B, output_dim).
Parameter names follow OpenAI's so public checkpoints map one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.encoders.vit import VisionOutput
from vlmkit.layers.patch import resample_grid_positions


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        # Anti-aliasing: every conv has stride 1; an avgpool does the striding (after conv2).
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or in_planes != planes * self.expansion:
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.downsample.add_module("0", nn.Conv2d(in_planes, planes * self.expansion, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """One multi-head attention whose query is the mean of the grid (plus positions)."""

    def __init__(self, grid: int, dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid**2 + 1, dim) / dim**0.5)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)
        self.heads = heads

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = grid.shape
        x = grid.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+HW, C)
        positions = resample_grid_positions(self.positional_embedding, (height, width))
        x = x + positions.to(x.dtype)
        head_dim = channels // self.heads
        query = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_dim).transpose(1, 2)  # (B, h, 1, d)
        key = self.k_proj(x).view(batch, -1, self.heads, head_dim).transpose(1, 2)  # (B, h, 1+HW, d)
        value = self.v_proj(x).view(batch, -1, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value)  # (B, h, 1, d)
        return self.c_proj(out.transpose(1, 2).reshape(batch, channels))  # (B, D)


class ModifiedResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...], output_dim: int, heads: int, image_size: int = 224, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._in_planes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32  # the ResNet feature dimension
        self.attnpool = AttentionPool2d(image_size // 32, embed_dim, heads, output_dim)
        self.width = embed_dim

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._in_planes, planes, stride)]
        self._in_planes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._in_planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor, output_hidden_states: bool = False, pooled_only: bool = False) -> VisionOutput:
        x = F.relu(self.bn1(self.conv1(pixels)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # (B, width, H/4, W/4)
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        pooled = self.attnpool(x)  # (B, D)
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C): the grid, for captioners
        return VisionOutput(pooled=pooled, tokens=tokens, hidden_states=stages if output_hidden_states else None)
