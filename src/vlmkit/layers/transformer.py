"""The transformer block and stack shared by every tower.

`TransformerBlock` is pre-LN by default (CLIP, ViT, GPT) and post-LN on request (BERT);
it can carry a cross-attention sublayer (decoders, Q-Former), LayerScale and drop-path.
`Transformer` stacks blocks and owns the gradient-checkpointing switch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmkit.layers.attention import Attention, KVCache
from vlmkit.layers.mlp import MLP


class LayerScale(nn.Module):
    """Learned per-channel scale on a residual branch (CaiT), initialised small."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    """x + attn(norm(x)) [+ cross(norm(x), context)] + mlp(norm(x)); post-LN when prenorm=False."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        context_dim: int | None = None,
        prenorm: bool = True,
        norm_eps: float = 1e-5,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, dropout=dropout)
        self.cross_attn = Attention(dim, num_heads, context_dim=context_dim) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=norm_eps) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation)
        self.scale1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.scale2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.residual_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def _residual(self, x, norm, sublayer, scale, num_queries=None):
        residual = x if num_queries is None else x[:, :num_queries]  # (B, N, D): the rows that ask
        if self.prenorm:
            return residual + self.drop_path(scale(self.residual_dropout(sublayer(norm(x)))))
        return norm(residual + self.drop_path(scale(self.residual_dropout(sublayer(x)))))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        name: str = "",
        num_queries: int | None = None,
    ) -> torch.Tensor:
        """`num_queries`: compute outputs for the first N positions only (see Attention)."""
        self_cache = cache.layer(name + ".self") if cache is not None else None
        x = self._residual(
            x, self.norm1, lambda h: self.attn(h, mask=mask, is_causal=is_causal, cache=self_cache, num_queries=num_queries),
            self.scale1, num_queries,
        )
        if self.cross_attn is not None and context is not None:
            cross_cache = cache.layer(name + ".cross") if cache is not None else None
            x = self._residual(
                x, self.norm_cross, lambda h: self.cross_attn(h, context=context, mask=context_mask, cache=cross_cache), nn.Identity()
            )
        return self._residual(x, self.norm2, self.mlp, self.scale2)


class Transformer(nn.Module):
    """A stack of `TransformerBlock`s. Returns the last hidden state, or every layer's on request."""

    def __init__(self, width: int, depth: int, num_heads: int, drop_path: float = 0.0, **block_kwargs) -> None:
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linearly increasing, as in timm
        self.blocks = nn.ModuleList(
            TransformerBlock(width, num_heads, drop_path=rate, **block_kwargs) for rate in rates
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_all: bool = False,
        last_layer_queries: int | None = None,
    ):
        """`last_layer_queries=N`: the last block computes only the first N positions (e.g. the
        [CLS] token a pooled embedding needs), skipping its MLP and output projection elsewhere."""
        hidden_states = [x]
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            num_queries = last_layer_queries if index == last else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, is_causal, context, context_mask, use_reentrant=False, num_queries=num_queries)
            else:
                x = block(x, mask, is_causal, context, context_mask, cache, name=f"block{index}", num_queries=num_queries)
            if return_all:
                hidden_states.append(x)
        return hidden_states if return_all else x
