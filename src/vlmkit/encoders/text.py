"""Text towers: causal (CLIP/GPT-like, pooled at end-of-text) and bidirectional (BERT-like).

tokens (B, L) -> token + position (+ type) embeddings -> blocks (causal mask, or padding mask)
-> final norm -> pool (eos / cls / mean over real tokens) -> projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.layers.masks import padding_mask, real_tokens_through_end
from vlmkit.layers.transformer import Transformer


@dataclass
class TextOutput:
    pooled: torch.Tensor  # (B, output_dim): the text embedding before normalisation
    tokens: torch.Tensor  # (B, L, width): last hidden state (after the final norm)
    hidden_states: list[torch.Tensor] | None = None


class TextTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        output_dim: int | None,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        causal: bool = True,
        pool: str = "eos",
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        prenorm: bool = True,
        embed_norm: bool = False,
        type_vocab_size: int = 0,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("eos", "argmax", "cls", "mean"):
            raise ValueError(f"unknown text pooling '{pool}'")
        self.causal, self.pool = causal, pool
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.type_embedding = nn.Embedding(type_vocab_size, width) if type_vocab_size else None
        self.embed_norm = nn.LayerNorm(width, eps=norm_eps) if embed_norm else None
        self.embed_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.transformer = Transformer(
            width, depth, heads, mlp_ratio=mlp_ratio, activation=activation, prenorm=prenorm,
            norm_eps=norm_eps, dropout=dropout,
        )
        # Post-LN stacks (BERT) already end in a norm; pre-LN stacks need a final one.
        self.final_norm = nn.LayerNorm(width, eps=norm_eps) if prenorm else nn.Identity()
        self.proj = nn.Linear(width, output_dim, bias=False) if output_dim else nn.Identity()
        self.context_length, self.width = context_length, width
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def real_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: True for tokens that are not padding."""
        if self.causal and self.eos_token_id is not None:
            # Causal CLIP text may pad with the end token itself; real = up to the first end token.
            return real_tokens_through_end(tokens, self.eos_token_id)
        return tokens != self.pad_token_id

    def end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) index of the pooled end token: the first eos, or the argmax id (OpenAI convention)."""
        if self.pool == "eos" and self.eos_token_id is not None:
            return (tokens == self.eos_token_id).int().argmax(dim=1)
        return tokens.argmax(dim=1)

    def trim_padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop trailing columns that are padding in every row (exact for causal towers).

        Every row holds its end token before any padding, so a block of all-pad columns at the
        end lies after every row's end token and cannot reach a pooled feature through the
        causal mask. Short captions in a 77-token context then cost what they are.
        """
        if self.pad_token_id == self.eos_token_id:
            # Padding with the end token itself (HF's openai tokenizer): every row keeps up to its
            # pooled end token, which an all-"pad" column may still be for one of the rows.
            return tokens[:, : int(self.end_positions(tokens).max()) + 1]
        is_pad = (tokens == self.pad_token_id).all(dim=0)  # (L,)
        if not bool(is_pad[-1]):
            return tokens
        keep = int((~is_pad).nonzero().max()) + 1 if bool((~is_pad).any()) else 1
        return tokens[:, :keep]

    def forward(self, tokens: torch.Tensor, token_types: torch.Tensor | None = None, output_hidden_states: bool = False) -> TextOutput:
        if self.causal and token_types is None and self.pool in ("eos", "argmax"):
            tokens = self.trim_padding(tokens)
        batch, length = tokens.shape  # (B, L)
        x = self.token_embedding(tokens) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)  # (B, L, W)
        if self.type_embedding is not None:
            types = token_types if token_types is not None else torch.zeros_like(tokens)
            x = x + self.type_embedding(types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.embed_dropout(x)
        if self.causal:
            # Padding sits after the end token, so causality alone keeps it out of the pooled feature.
            hidden = self.transformer(x, is_causal=True, return_all=output_hidden_states)
        else:
            hidden = self.transformer(x, mask=padding_mask(self.real_tokens(tokens)), return_all=output_hidden_states)
        last = hidden[-1] if output_hidden_states else hidden
        x = self.final_norm(last)  # (B, L, W)
        if self.pool in ("eos", "argmax"):
            pooled = x[torch.arange(batch, device=x.device), self.end_positions(tokens)]  # (B, W)
        elif self.pool == "cls":
            pooled = x[:, 0]
        else:
            real = self.real_tokens(tokens).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
            pooled = (x * real).sum(dim=1) / real.sum(dim=1).clamp(min=1e-9)
        return TextOutput(pooled=self.proj(pooled), tokens=x, hidden_states=hidden if output_hidden_states else None)
