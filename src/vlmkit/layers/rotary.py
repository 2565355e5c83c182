"""Rotary position embeddings (RoFormer), in HF Llama's convention.

inv_freq = 1 / theta ** (arange(0, d, 2) / d); angles = position * inv_freq, duplicated to d
features ([f; f], the "rotate_half" layout rather than interleaved pairs); q and k are rotated
as x * cos + rotate_half(x) * sin. Angles are computed in float32 from per-row position ids, so
left-padded rows and KV-cached steps rotate every token by its own position. Nothing is stored:
the frequencies are recomputed per forward (d/2 values), so a model built on the meta device and
loaded from a file needs no buffer filled in.
"""
from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """1 / theta ** (arange(0, d, 2) / d), float32. (d/2,)"""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rotary_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, float32. position_ids (B, T) -> two (B, T, d)."""
    freqs = position_ids[..., None].float() * inverse_frequencies(head_dim, theta, position_ids.device)  # (B, T, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, d)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1; x2] -> [-x2; x1] over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate heads x (B, H, T, d) by cos/sin (B, T, d), computed in x's dtype."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, d)
    return x * cos + rotate_half(x) * sin
