"""The Q-Former (BLIP-2, Li et al. 2023): a BERT-style stack over [learned queries ; text].

    queries (B, Nq, D) -> embed_norm                       (no positions)
    text    (B, T)     -> token + position -> embed_norm
    [queries ; text] -> blocks -> (B, Nq+T, D)
    block: post-LN self-attention over the whole sequence (what sees what is the mask, see
           layers/masks.qformer_mask) -> cross-attention to the image, queries only, in blocks
           0, f, 2f, ... (f = cross_attention_frequency) -> a feed-forward of the queries' own
           (mlp_query) and the text's (mlp)

Parameter names follow `TokenTransformer` (`token_embedding`, `positional_embedding`,
`embed_norm`, `transformer.blocks.N.{attn,norm1,mlp,norm2}`), so a BERT / MiniLM text tower loads
into it by the same mapping; the query FFN and cross-attention are the Q-Former's own.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.layers.attention import Attention
from vlmkit.layers.mlp import MLP


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
                context: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attn(x, mask=mask)))  # (B, Nq+T, D)
        queries, text = x[:, :num_queries], x[:, num_queries:]  # (B, Nq, D), (B, T, D)
        if num_queries and self.cross_attn is not None and context is not None:  # text never sees the image
            queries = self.norm_cross(queries + self.dropout(self.cross_attn(queries, context=context)))
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

    def forward(self, query_embeds: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, Nq+T, D) of [query_embeds (B, Nq, D) ; tokens (B, T)]; `mask` boolean,
        broadcastable to (B, heads, Nq+T, Nq+T); `context` (B, N, C) the image features."""
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
        for block in self.transformer.blocks:
            x = block(x, num_queries, mask, context)
        return x
