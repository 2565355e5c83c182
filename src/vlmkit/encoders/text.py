"""Text towers: causal (CLIP/GPT-like, pooled at end-of-text) and bidirectional (BERT-like).

tokens (B, L) -> `TokenTransformer` (token + position (+ type) embeddings -> blocks with a causal
mask or a padding mask -> final norm) -> pool (eos / cls / mean over real tokens) -> projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.layers.masks import padding_mask, real_tokens_through_end
from vlmkit.layers.transformer import TokenTransformer


@dataclass
class TextOutput:
    pooled: torch.Tensor  # (B, output_dim): the text embedding before normalisation
    tokens: torch.Tensor  # (B, L, width): last hidden state (after the final norm)
    hidden_states: list[torch.Tensor] | None = None


class TextTransformer(TokenTransformer):
    """The shared stack plus pooling and a projection; its parameter names are the interop mappings'."""

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
        if pool not in ("eos", "argmax", "cls", "mean"):
            raise ValueError(f"unknown text pooling '{pool}'")
        super().__init__(
            vocab_size, context_length, width, depth, heads, mlp_ratio=mlp_ratio, activation=activation,
            prenorm=prenorm, norm_eps=norm_eps, dropout=dropout, type_vocab_size=type_vocab_size, embed_norm=embed_norm,
        )
        self.causal, self.pool = causal, pool
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.proj = nn.Linear(width, output_dim, bias=False) if output_dim else nn.Identity()

    @torch.no_grad()
    def init_openclip(self) -> None:
        """OpenCLIP's `TextTransformer.init_parameters`: normal weights with depth-scaled stds.

        Attention in-projection std width**-0.5, residual output projections (attention out, MLP
        fc2) width**-0.5 * (2 * depth)**-0.5, MLP fc1 (2 * width)**-0.5, the text projection
        width**-0.5, zero attention biases; token embedding std 0.02 and positions std 0.01 (already so).
        """
        width, depth = self.width, len(self.transformer.blocks)
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * max(depth, 1)) ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            for bias in (block.attn.qkv.bias, block.attn.out.bias):
                if bias is not None:
                    nn.init.zeros_(bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=width**-0.5)

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
        batch = tokens.shape[0]  # (B, L)
        # Causal: padding sits after the end token, so causality alone keeps it out of the pooled feature.
        mask = None if self.causal else padding_mask(self.real_tokens(tokens))  # (B, 1, 1, L)
        out = super().forward(tokens, token_types=token_types, mask=mask, is_causal=self.causal,
                              output_hidden_states=output_hidden_states)
        x, hidden = out if output_hidden_states else (out, None)  # (B, L, W), every block's output or None
        if self.pool in ("eos", "argmax"):
            pooled = x[torch.arange(batch, device=x.device), self.end_positions(tokens)]  # (B, W)
        elif self.pool == "cls":
            pooled = x[:, 0]
        else:
            real = self.real_tokens(tokens).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
            pooled = (x * real).sum(dim=1) / real.sum(dim=1).clamp(min=1e-9)
        return TextOutput(pooled=self.proj(pooled), tokens=x, hidden_states=hidden)
