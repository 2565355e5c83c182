"""A decoder-only language model with optional cross-attention to image (or any) context tokens.

tokens (B, T) -> `TokenTransformer` (token + position embeddings -> causal blocks [+ cross-attention
to `context` in every N-th block] -> final norm) -> LM head (tied to the token embedding by
default) -> logits (B, T, V).

VirTex uses it with cross-attention to the CNN grid; Flamingo/LLaVA-style families use it
without (context=None skips the cross-attention sublayers). During decoding a `KVCache` keeps
every block's self-attention keys/values and the image keys/values of the cross-attention
(computed once), so a step costs one token's worth of compute.
"""
from __future__ import annotations

import torch

from vlmkit.layers.attention import KVCache
from vlmkit.layers.transformer import TokenTransformer


class DecoderLM(TokenTransformer):
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
        super().__init__(
            vocab_size, context_length, width, depth, heads, mlp_ratio=mlp_ratio, activation=activation,
            norm_eps=norm_eps, dropout=dropout, context_dim=context_dim, cross_attention_every=cross_attention_every,
            tie_embeddings=tie_embeddings,
        )

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
        x = super().forward(tokens, position_offset=position_offset, mask=mask, is_causal=True,
                            context=context, context_mask=context_mask, cache=cache)  # (B, T, D)
        return self.logits(x)  # (B, T, V)


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


def random_texts(text, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """`random_tokens` shaped by a TextConfig, ended by its eos token (the last id for towers without one). (B, L)"""
    end = text.eos_token_id if text.eos_token_id is not None else text.vocab_size - 1
    return random_tokens(text.vocab_size, text.context_length, end, text.pad_token_id, batch_size, generator)
