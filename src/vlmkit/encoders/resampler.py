"""The Perceiver Resampler (Flamingo, Alayrac et al. 2022, sec. 2.1 and fig. 5).

    image features (B, N, W) (any N: patches of any size, frames, several images' worth)
    latents (L, W), learned -> per layer:
        latents = attn(q = latents, k = v = [features ; latents]) + latents
        latents = ff(latents) + latents
    -> LayerNorm -> (B, L, W): a fixed number L of visual tokens whatever N is.

Layout as OpenFlamingo's `PerceiverResampler` and HF IDEFICS's `IdeficsPerceiverResampler`: the
attention normalises features and latents with their own LayerNorms, projects without biases
(`heads * head_dim` inner width, fused k/v here), and the feed-forward is LayerNorm -> Linear ->
activation (GELU in OpenFlamingo, ReLU in IDEFICS) -> Linear, without biases.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.layers.mlp import make_activation


class PerceiverAttention(nn.Module):
    """Latents ask, features and latents answer. (B, N, W), (B, L, W) -> (B, L, W)"""

    def __init__(self, dim: int, heads: int, head_dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_latents = nn.LayerNorm(dim, eps=norm_eps)
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm_media(features), self.norm_latents(latents)
        batch, num_latents, _ = latents.shape
        query = self.q(latents).view(batch, num_latents, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        both = torch.cat([features, latents], dim=1)  # (B, N+L, W)
        key, value = self.kv(both).view(batch, both.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(query, key, value)  # (B, H, L, Dh)
        return self.out(out.transpose(1, 2).reshape(batch, num_latents, -1))  # (B, L, W)


class ResamplerFeedForward(nn.Module):
    """LayerNorm -> Linear(W, mult W) -> activation -> Linear(mult W, W), no biases."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int, activation: str, norm_eps: float) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, head_dim, norm_eps)
        self.ff = ResamplerFeedForward(dim, ff_mult * dim, activation, norm_eps)


class PerceiverResampler(nn.Module):
    """`num_latents` learned queries resample any number of image features to `num_latents` tokens.

    `forward(features (B, N, W)) -> (B, num_latents, W)`; depth, heads, head_dim and the
    feed-forward multiple follow the paper's names (64 latents, depth 6, 8 heads of 64 in
    OpenFlamingo).
    """

    def __init__(self, dim: int, depth: int = 6, heads: int = 8, head_dim: int = 64, num_latents: int = 64,
                 ff_mult: int = 4, activation: str = "gelu", norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads, head_dim, ff_mult, activation, norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(features.dtype).expand(features.shape[0], -1, -1)  # (B, L, W)
        for layer in self.layers:
            latents = layer.attn(features, latents) + latents
            latents = layer.ff(latents) + latents
        return self.norm(latents)  # (B, L, W)
