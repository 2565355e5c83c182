"""A decoder-only language model with optional cross-attention to image (or any) context tokens.

tokens (B, T) -> token + position embeddings -> causal blocks [+ cross-attention to `context`
in every N-th block] -> final norm -> LM head (tied to the token embedding by default)
-> logits (B, T, V).

VirTex uses it with cross-attention to the CNN grid; Flamingo/LLaVA-style families use it
without (context=None skips the cross-attention sublayers). During decoding a `KVCache` keeps
every block's self-attention keys/values and the image keys/values of the cross-attention
(computed once), so a step costs one token's worth of compute.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.layers.attention import KVCache
from vlmkit.layers.masks import causal_mask, combine
from vlmkit.layers.transformer import TransformerBlock


class DecoderLM(nn.Module):
    """Causal transformer LM; `cross_attention_every=N` puts a cross-attention sublayer in blocks N-1, 2N-1, ..."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        context_dim: int | None = None,
        cross_attention_every: int = 1,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                width, heads, mlp_ratio=mlp_ratio, activation=activation, norm_eps=norm_eps, dropout=dropout,
                context_dim=context_dim if context_dim and (index + 1) % cross_attention_every == 0 else None,
            )
            for index in range(depth)
        )
        self.final_norm = nn.LayerNorm(width, eps=norm_eps)
        self.lm_head = None if tie_embeddings else nn.Linear(width, vocab_size, bias=False)
        self.context_length, self.width, self.vocab_size = context_length, width, vocab_size
        self.gradient_checkpointing = False
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_offset: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) of the next token at every position of `tokens` (B, T).

        `mask` is an extra boolean key mask (e.g. (B, 1, 1, K) for left-padded prompts, K =
        cached + new positions), ANDed with causality. `position_offset` defaults to the number
        of cached positions, so a cached step continues where the previous one stopped; a (B,)
        tensor gives each row its own (left-padded prompts start their positions at the first real token).
        """
        batch, length = tokens.shape  # (B, T)
        offset = (cache.length if cache is not None else 0) if position_offset is None else position_offset
        if torch.is_tensor(offset):  # per-row offsets; left padding sits at negative positions (masked, any row will do)
            positions = self.positional_embedding[(torch.arange(length, device=tokens.device) + offset[:, None]).clamp(min=0)]
        else:
            if offset + length > self.context_length:
                raise ValueError(f"sequence of {offset + length} tokens exceeds the decoder's context length {self.context_length}")
            positions = self.positional_embedding[offset : offset + length]
        x = self.token_embedding(tokens) + positions.to(self.token_embedding.weight.dtype)  # (B, T, D)
        is_causal = mask is None
        if mask is not None:
            keys = (cache.length if cache is not None else 0) + length
            mask = combine(causal_mask(length, keys, device=tokens.device), mask)  # (B, 1, T, K)
        for index, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, x, mask, is_causal, context, context_mask, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, context, context_mask, cache, name=f"block{index}")  # (B, T, D)
        x = self.final_norm(x)
        weight = self.token_embedding.weight if self.lm_head is None else self.lm_head.weight
        return x @ weight.T  # (B, T, V)


def random_tokens(vocab_size: int, context_length: int, eos_token_id: int, pad_token_id: int, batch_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Random texts of different lengths, each ended and padded like a tokenizer's output. (B, L)

    For `dummy_batch` (the registry-wide model tests) of families with a text side.
    """
    tokens = torch.randint(1, vocab_size - 2, (batch_size, context_length), generator=generator)
    for row in range(batch_size):
        length = 3 + (row * 4) % (context_length - 4)
        tokens[row, length] = eos_token_id
        tokens[row, length + 1 :] = pad_token_id
    return tokens
