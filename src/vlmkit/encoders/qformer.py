"""The Q-Former (BLIP-2, Li et al. 2023): a BERT-style stack over [learned queries ; text].

    queries (B, Nq, D) -> embed_norm                       (no positions)
    text    (B, T)     -> token + position -> embed_norm
    [queries ; text] -> blocks -> (B, Nq+T, D)
    block: post-LN self-attention over the whole sequence (what sees what is the mask, see
           layers/masks.qformer_mask) -> cross-attention to the image, queries only, in blocks
           0, f, 2f, ... (f = cross_attention_frequency) -> a feed-forward of the queries' own
           (mlp_query) and the text's (mlp)

`context` is the image features (B, N, C), or their `ImageKeys`: every cross-attention block's keys
and values, projected once by `QFormer.image_keys` and reused by several passes over the same
images (`ImageKeys.rows` picks images, e.g. hard negatives). Both give the same outputs.

Parameter names follow `TokenTransformer` (`token_embedding`, `positional_embedding`,
`embed_norm`, `transformer.blocks.N.{attn,norm1,mlp,norm2}`), so a BERT / MiniLM text tower loads
into it by the same mapping; the query FFN and cross-attention are the Q-Former's own.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.layers.attention import Attention, LayerCache
from vlmkit.layers.mlp import MLP


class ImageKeys:
    """The keys and values (B, H, N, Dh) of image features in each cross-attention block, by block index."""

    def __init__(self, layers: dict[int, LayerCache]) -> None:
        self.layers = layers

    def rows(self, index: torch.Tensor) -> "ImageKeys":
        """The keys and values of images `index` (B',) (with repeats): row b' is image index[b']."""
        return ImageKeys({block: LayerCache(cache.key[index], cache.value[index]) for block, cache in self.layers.items()})


class QFormerBlock(nn.Module):
    """One Q-Former layer; `context_dim` set: it cross-attends (queries only) to image features."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, activation: str, norm_eps: float, dropout: float,
                 context_dim: int | None, text: bool = True) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = Attention(dim, heads, context_dim=context_dim, dropout=dropout) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=norm_eps) if context_dim else None
        self.mlp = MLP(dim, mlp_hidden, activation) if text else None  # the text FFN (none in a query-only Q-Former)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps) if text else None
        self.mlp_query = MLP(dim, mlp_hidden, activation)
        self.norm2_query = nn.LayerNorm(dim, eps=norm_eps)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, num_queries: int, mask: torch.Tensor | None,
                context: torch.Tensor | None, context_keys: LayerCache | None = None,
                queries_only: bool = False) -> torch.Tensor:
        """`context` (B, N, C) image features, or `context_keys` their keys and values in this block.
        `queries_only`: return only the queries' rows (B, Nq, D); the text still gives keys and values."""
        if queries_only:  # the text rows' own outputs are not computed (only what the queries read)
            rows_mask = None if mask is None else mask[..., :num_queries, :]
            x = self.norm1(x[:, :num_queries] + self.dropout(self.attn(x, mask=rows_mask, num_queries=num_queries)))
        else:
            x = self.norm1(x + self.dropout(self.attn(x, mask=mask)))  # (B, Nq+T, D)
        queries, text = x[:, :num_queries], x[:, num_queries:]  # (B, Nq, D), (B, T, D)
        sees_image = context is not None or context_keys is not None
        if num_queries and self.cross_attn is not None and sees_image:  # text never sees the image
            attended = self.cross_attn(queries, context=context, cache=context_keys)  # (B, Nq, D)
            queries = self.norm_cross(queries + self.dropout(attended))
        parts = []
        if num_queries:
            parts.append(self.norm2_query(queries + self.dropout(self.mlp_query(queries))))
        if text.shape[1]:
            parts.append(self.norm2(text + self.dropout(self.mlp(text))))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class _Blocks(nn.Module):
    """Holds `blocks` so parameter names read `transformer.blocks.N` as in `TokenTransformer`."""

    def __init__(self, blocks: list[QFormerBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class QFormer(nn.Module):
    """Embeddings + Q-Former blocks; `forward` takes query embeddings, text ids, or both (queries first)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int, context_dim: int,
                 cross_attention_frequency: int = 2, mlp_ratio: float = 4.0, activation: str = "gelu",
                 norm_eps: float = 1e-12, dropout: float = 0.0, text: bool = True) -> None:
        """`text=False` builds the query-only Q-Former of BLIP-2's stage 2 (LAVIS removes the word
        embeddings and text FFN there; so does HF's Blip2QFormerModel): no token or position table."""
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width) if text else None
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01) if text else None
        self.embed_norm = nn.LayerNorm(width, eps=norm_eps)
        self.embed_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        hidden = int(width * mlp_ratio)
        self.transformer = _Blocks([
            QFormerBlock(width, heads, hidden, activation, norm_eps, dropout,
                         context_dim if index % cross_attention_frequency == 0 else None, text=text)
            for index in range(depth)
        ])
        self.context_length, self.width = context_length, width
        if text:
            nn.init.normal_(self.token_embedding.weight, std=0.02)

    def image_keys(self, context: torch.Tensor) -> ImageKeys:
        """Every cross-attention block's keys and values of image features `context` (B, N, C)."""
        return ImageKeys({index: LayerCache(*block.cross_attn.context_keys(context))
                          for index, block in enumerate(self.transformer.blocks) if block.cross_attn is not None})

    def forward(self, query_embeds: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, context: torch.Tensor | ImageKeys | None = None,
                queries_only: bool = False) -> torch.Tensor:
        """Hidden states (B, Nq+T, D) of [query_embeds (B, Nq, D) ; tokens (B, T)]; `mask` boolean,
        broadcastable to (B, heads, Nq+T, Nq+T); `context` (B, N, C) the image features or their
        `image_keys`. `queries_only`: only the queries' outputs (B, Nq, D), as image-text matching
        reads them; the last block then skips the text rows (same values, less work)."""
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)  # (B, Nq, D): no positions
        if tokens is not None:
            if self.token_embedding is None:
                raise ValueError("this Q-Former is query-only (text=False); it takes no text tokens")
            if tokens.shape[1] > self.context_length:
                raise ValueError(f"text of {tokens.shape[1]} tokens exceeds the Q-Former's {self.context_length} positions")
            parts.append(self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]])  # (B, T, D)
        x = self.embed_dropout(self.embed_norm(torch.cat(parts, dim=1)))  # (B, Nq+T, D)
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        keys = context if isinstance(context, ImageKeys) else None
        features = None if keys is not None else context
        if queries_only and not num_queries:
            raise ValueError("queries_only needs query embeddings")
        last = len(self.transformer.blocks) - 1
        for index, block in enumerate(self.transformer.blocks):
            x = block(x, num_queries, mask, features, None if keys is None else keys.layers.get(index),
                      queries_only=queries_only and index == last)
        return x[:, :num_queries] if queries_only else x
