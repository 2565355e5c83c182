"""The gated cross-attention dense block (Flamingo, Alayrac et al. 2022, fig. 4), family-agnostic.

    x = x + tanh(attn_gate) * cross_attn(norm(x), media)     (tokens that see no image add 0)
    x = x + tanh(ff_gate)   * ff(norm(x))

Both gates are learned scalars initialised at 0, so a freshly built block is the identity and a
frozen LM with these blocks inserted gives exactly the LM's logits (tested). The media mask
(`layers.masks.media_mask`) says which visual tokens each text token sees. Norm and feed-forward
are chosen per model: LayerNorm + GELU MLP without biases (OpenFlamingo), RMSNorm + SwiGLU
(HF IDEFICS). During cached decoding the media keys/values are computed once (the attention's
cross cache) and reused by every step.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.layers.attention import Attention, LayerCache
from vlmkit.layers.mlp import MLP
from vlmkit.layers.norm import make_norm


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention to media tokens and a feed-forward, each scaled by tanh of a zero-initialised gate."""

    def __init__(self, dim: int, context_dim: int, heads: int, mlp_hidden: int, norm: str = "layernorm",
                 norm_eps: float = 1e-5, activation: str = "gelu", gated_mlp: bool = False) -> None:
        super().__init__()
        self.attn_norm = make_norm(norm, dim, norm_eps)
        self.attn = Attention(dim, heads, context_dim=context_dim, qkv_bias=False, out_bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = make_norm(norm, dim, norm_eps)
        self.ff = MLP(dim, mlp_hidden, activation, bias=False, gated=gated_mlp)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, mask: torch.Tensor, attends_any: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        """`x` (B, T, D) text states; `media` (B, M, C) visual tokens; `mask` (B, 1, T, M) and
        `attends_any` (B, T) from `media_mask`; `cache`: the media keys/values, kept across steps."""
        if media.shape[1]:  # a prompt without images has nothing to attend to (the feed-forward still runs)
            attended = self.attn(self.attn_norm(x), context=media, mask=mask, cache=cache)  # (B, T, D)
            attended = attended * attends_any[:, :, None].to(attended.dtype)  # text before any image adds nothing
            x = x + torch.tanh(self.attn_gate) * attended
        return x + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(x))  # (B, T, D)
