"""A text-conditional diffusion U-Net (GLIDE's, after guided-diffusion's `UNetModel`, made small).

x_t (B, C, H, W), timesteps (B,), text tokens (B, L, Dt) + pooled text (B, Dt) -> eps (B, C, H, W)

- timestep: sinusoidal embedding -> MLP -> emb (B, E); the pooled text, projected, is added to it
  (GLIDE's `xf_proj` of the last token).
- residual blocks: GroupNorm -> SiLU -> conv, emb as a scale and shift of the second norm
  (`use_scale_shift_norm`), dropout, zero-initialised last conv, 1x1 skip when channels change.
- attention blocks at the chosen resolutions: self-attention over the H*W positions whose keys and
  values are preceded by the text tokens' own (GLIDE's `encoder_kv`), padding tokens masked out.
- encoder (down) levels with skip connections, a middle (res, attention, res), a decoder (up)
  reading every skip, a zero-initialised output conv.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) steps -> (B, dim) [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / (dim / 2)) (guided-diffusion's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: a block then starts as the identity of its residual path."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.in_norm, self.in_conv = _norm(channels, groups), nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)  # scale and shift of the second norm
        self.out_norm = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))  # (B, C', H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C', 1, 1) each
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class TextAttentionBlock(nn.Module):
    """Self-attention over positions, with the text tokens' keys and values in front (GLIDE's encoder_kv)."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels are not divisible by {heads} attention heads")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.encoder_kv = nn.Linear(context_dim, 2 * channels)
        self.out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        heads, head_dim = self.heads, channels // self.heads
        qkv = self.qkv(self.norm(x).view(batch, channels, -1))  # (B, 3C, HW)
        q, k, v = qkv.view(batch, 3, heads, head_dim, -1).permute(1, 0, 2, 4, 3).unbind(0)  # (B, h, HW, d) each
        text_k, text_v = self.encoder_kv(context).view(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, d)
        k, v = torch.cat([text_k, k], dim=2), torch.cat([text_v, v], dim=2)  # (B, h, L + HW, d)
        visible = torch.cat([context_mask, context_mask.new_ones(batch, height * width)], dim=1)  # (B, L + HW)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])  # (B, h, HW, d)
        out = out.transpose(2, 3).reshape(batch, channels, height * width)  # (B, C, HW)
        return x + self.out(out).view(batch, channels, height, width)


class _Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, each followed by attention when asked."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module | None]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList([a if a is not None else nn.Identity() for a in attentions])
        self.has_attention = [a is not None for a in attentions]


class TextConditionalUNet(nn.Module):
    """eps-prediction U-Net conditioned on text tokens (attention) and pooled text (timestep embedding)."""

    def __init__(self, image_size: int, in_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 attention_resolutions: Sequence[int], heads: int, context_dim: int, groups: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        emb_dim = 4 * channels
        self.channels = channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_embed = nn.Linear(context_dim, emb_dim)  # pooled text -> added to the timestep embedding
        self.input_conv = nn.Conv2d(in_channels, channels, 3, padding=1)

        def attention(width: int, resolution: int):
            return TextAttentionBlock(width, heads, context_dim, groups) if resolution in attention_resolutions else None

        skips, width, resolution = [channels], channels, image_size
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, channels * mult, emb_dim, groups, dropout))
                width = channels * mult
                attentions.append(attention(width, resolution))
                skips.append(width)
            self.down.append(_Level(blocks, attentions))
            last = level == len(channel_mult) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            if not last:
                skips.append(width)
                resolution //= 2
        self.middle = _Level([ResBlock(width, width, emb_dim, groups, dropout), ResBlock(width, width, emb_dim, groups, dropout)],
                             [TextAttentionBlock(width, heads, context_dim, groups), None])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(width + skips.pop(), channels * mult, emb_dim, groups, dropout))
                width = channels * mult
                attentions.append(attention(width, resolution))
            self.up.append(_Level(blocks, attentions))
            self.upsample.append(nn.Identity() if level == 0 else nn.Conv2d(width, width, 3, padding=1))
            if level:
                resolution *= 2
        self.out_norm = _norm(width, groups)
        self.out_conv = _zero(nn.Conv2d(width, in_channels, 3, padding=1))

    @staticmethod
    def _run(level: _Level, h: torch.Tensor, emb: torch.Tensor, context, mask, index: int) -> torch.Tensor:
        h = level.blocks[index](h, emb)
        return level.attentions[index](h, context, mask) if level.has_attention[index] else h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), timesteps (B,), context (B, L, Dt), context_mask (B, L) bool, pooled (B, Dt) -> (B, C, H, W)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.channels)) + self.text_embed(pooled)  # (B, E)
        h = self.input_conv(x)
        skips = [h]
        for level, downsample in zip(self.down, self.downsample):
            for index in range(len(level.blocks)):
                h = self._run(level, h, emb, context, context_mask, index)
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)  # (B, C, H/2, W/2)
                skips.append(h)
        for index in range(2):
            h = self._run(self.middle, h, emb, context, context_mask, index)
        for level, upsample in zip(self.up, self.upsample):
            for index in range(len(level.blocks)):
                h = self._run(level, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask, index)
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, scale_factor=2, mode="nearest"))  # (B, C, 2H, 2W)
        return self.out_conv(F.silu(self.out_norm(h)))
