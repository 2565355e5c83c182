"""The transformer block and the one transformer stack every tower is built on.

`TransformerBlock` is pre-LN by default (CLIP, ViT, GPT) and post-LN on request (BERT);
it can carry a cross-attention sublayer (decoders, Q-Former), LayerScale and drop-path, and
takes the Llama options: RMSNorm (`norm="rmsnorm"`), grouped-query attention (`kv_heads`), a
gated SwiGLU MLP (`gated_mlp`, `mlp_hidden`) and no biases (`bias=False`). With
`decoder_attention=True` a block holds a second self-attention (and its norm) that a forward with
`decoder=True` uses instead of the first: BLIP's causal decoder shares every other parameter
(embeddings, cross-attention, MLP) with its bidirectional encoder.
`Transformer` stacks blocks (cross-attention in every N-th) and owns the gradient-checkpointing
switch, the only one in the library. `TokenTransformer` is the whole text stack on top of it:

    tokens (B, T) -> token + learned position (+ type) embeddings [-> norm] [-> dropout]
    [precomputed embeddings in front, e.g. image tokens] -> blocks -> final norm (B, T, D)
    [-> LM head tied to the token embedding, or its own] -> logits (B, T, V)

With `positions="rotary"` there is no position table: every block's attention rotates its
queries and keys by the tokens' positions instead (Llama), computed once per forward.

The text towers (CLIP's causal one, BERT's bidirectional one), the decoder LM and SimVLM's
PrefixLM are all a `TokenTransformer` with different masks, heads and pooling.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmkit.layers.attention import Attention, KVCache
from vlmkit.layers.masks import causal_mask, combine
from vlmkit.layers.mlp import MLP
from vlmkit.layers.norm import make_norm
from vlmkit.layers.rotary import rotary_angles

POSITIONS = ("learned", "rotary")


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
        norm: str = "layernorm",
        kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        gated_mlp: bool = False,
        bias: bool = True,
        decoder_attention: bool = False,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.attn = Attention(dim, num_heads, dropout=dropout, qkv_bias=bias, out_bias=bias, kv_heads=kv_heads)
        # A second self-attention for decoder-mode forwards (BLIP); everything else is shared.
        self.decoder_attn = (Attention(dim, num_heads, dropout=dropout, qkv_bias=bias, out_bias=bias, kv_heads=kv_heads)
                             if decoder_attention else None)
        self.decoder_norm1 = make_norm(norm, dim, norm_eps) if decoder_attention else None
        self.cross_attn = Attention(dim, num_heads, context_dim=context_dim, qkv_bias=bias, out_bias=bias) if context_dim else None
        self.norm_cross = make_norm(norm, dim, norm_eps) if context_dim else None
        self.norm2 = make_norm(norm, dim, norm_eps)
        self.mlp = MLP(dim, mlp_hidden or int(dim * mlp_ratio), activation, bias=bias, gated=gated_mlp)
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
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        decoder: bool = False,
    ) -> torch.Tensor:
        """`num_queries`: compute outputs for the first N positions only (see Attention); `rotary`:
        the (cos, sin) of rotary positions for the self-attention; `decoder`: use the decoder
        self-attention (a block built without one uses its only self-attention)."""
        self_cache = cache.layer(name + ".self") if cache is not None else None
        attn, norm1 = (self.decoder_attn, self.decoder_norm1) if decoder and self.decoder_attn is not None else (self.attn, self.norm1)
        x = self._residual(
            x, norm1,
            lambda h: attn(h, mask=mask, is_causal=is_causal, cache=self_cache, num_queries=num_queries, rotary=rotary),
            self.scale1, num_queries,
        )
        if self.cross_attn is not None and context is not None:
            cross_cache = cache.layer(name + ".cross") if cache is not None else None
            x = self._residual(
                x, self.norm_cross, lambda h: self.cross_attn(h, context=context, mask=context_mask, cache=cross_cache), nn.Identity()
            )
        return self._residual(x, self.norm2, self.mlp, self.scale2)


class Transformer(nn.Module):
    """A stack of `TransformerBlock`s. Returns the last hidden state, or every layer's on request.

    `context_dim` gives blocks a cross-attention sublayer: every block, or with
    `cross_attention_every=N` blocks N-1, 2N-1, ... (Flamingo-style sparse cross-attention).
    """

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        drop_path: float = 0.0,
        context_dim: int | None = None,
        cross_attention_every: int = 1,
        **block_kwargs,
    ) -> None:
        """`block_kwargs` go to every `TransformerBlock` (e.g. `decoder_attention=True`)."""
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linearly increasing, as in timm
        self.blocks = nn.ModuleList(
            TransformerBlock(
                width, num_heads, drop_path=rate, **block_kwargs,
                context_dim=context_dim if (index + 1) % cross_attention_every == 0 else None,
            )
            for index, rate in enumerate(rates)
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
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        decoder: bool = False,
        before_block=None,
        num_blocks: int | None = None,
    ):
        """`last_layer_queries=N`: the last block computes only the first N positions (e.g. the
        [CLS] token a pooled embedding needs), skipping its MLP and output projection elsewhere.
        `rotary`: (cos, sin) of rotary positions, shared by every block. `before_block(index, x) -> x`,
        if given, runs before every block: layers inserted into a frozen stack (Flamingo's gated
        cross-attention) without changing its blocks. `num_blocks=K`: run the first K blocks only
        (a caller that reads an intermediate layer's output)."""
        hidden_states = [x]
        blocks = self.blocks if num_blocks is None else self.blocks[:num_blocks]
        last = len(blocks) - 1
        for index, block in enumerate(blocks):
            if before_block is not None:
                x = before_block(index, x)
            num_queries = last_layer_queries if index == last else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, is_causal, context, context_mask, use_reentrant=False, num_queries=num_queries,
                               rotary=rotary, decoder=decoder)
            else:
                x = block(x, mask, is_causal, context, context_mask, cache, name=f"block{index}", num_queries=num_queries,
                          rotary=rotary, decoder=decoder)
            if return_all:
                hidden_states.append(x)
        return hidden_states if return_all else x


class TokenTransformer(nn.Module):
    """Embeddings + `Transformer` + final norm (+ LM head): the stack of every text tower and LM.

    Options cover the families: `type_vocab_size` and `embed_norm` (BERT's token types and
    embedding LayerNorm), `prenorm=False` (post-LN blocks already end in a norm, so no final one),
    `context_dim` / `cross_attention_every` (cross-attention to image tokens), and
    `tie_embeddings=False` (an LM head of its own instead of the token embedding). The decoder-LM
    options (`norm`, `positions`, `kv_heads`, `mlp_hidden`, `gated_mlp`, `bias`, `rope_theta`)
    give the Llama style; their defaults are the GPT/CLIP stack. Parameter names
    (`token_embedding`, `positional_embedding`, `type_embedding`, `embed_norm`, `transformer.blocks.N`,
    `final_norm`, `lm_head`) are what the HF / OpenCLIP / BERT interop mappings name; a rotary
    stack has no `positional_embedding`.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        prenorm: bool = True,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        type_vocab_size: int = 0,
        embed_norm: bool = False,
        context_dim: int | None = None,
        cross_attention_every: int = 1,
        tie_embeddings: bool = True,
        norm: str = "layernorm",
        positions: str = "learned",
        kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        gated_mlp: bool = False,
        bias: bool = True,
        rope_theta: float = 10000.0,
        decoder_attention: bool = False,
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions '{positions}'; use one of {', '.join(POSITIONS)}")
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01) if positions == "learned" else None
        self.type_embedding = nn.Embedding(type_vocab_size, width) if type_vocab_size else None
        self.embed_norm = nn.LayerNorm(width, eps=norm_eps) if embed_norm else None
        self.embed_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.transformer = Transformer(
            width, depth, heads, mlp_ratio=mlp_ratio, activation=activation, prenorm=prenorm, norm_eps=norm_eps,
            dropout=dropout, context_dim=context_dim, cross_attention_every=cross_attention_every,
            norm=norm, kv_heads=kv_heads, mlp_hidden=mlp_hidden, gated_mlp=gated_mlp, bias=bias,
            decoder_attention=decoder_attention,
        )
        # Post-LN stacks (BERT) already end in a norm; pre-LN stacks need a final one.
        self.final_norm = make_norm(norm, width, norm_eps) if prenorm else nn.Identity()
        self.lm_head = None if tie_embeddings else nn.Linear(width, vocab_size, bias=False)
        self.context_length, self.width, self.vocab_size = context_length, width, vocab_size
        self.positions, self.rope_theta, self.head_dim = positions, rope_theta, width // heads
        # BERT's initializer_range for every embedding. nn.Embedding's own N(0, 1) would make the token-type row
        # (the same for every token) 50x the token rows, and the embedding LayerNorm would leave every position
        # nearly the same vector: a from-scratch BERT-style tower then starts with no content signal.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if self.type_embedding is not None:
            nn.init.normal_(self.type_embedding.weight, std=0.02)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token embedding alone, no positions. (B, T) -> (B, T, D)"""
        return self.token_embedding(tokens)

    def embed(
        self, tokens: torch.Tensor | None, position_offset: int | torch.Tensor = 0, token_types: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token (or given `inputs_embeds`) + learned position (+ type) embeddings, normed and dropped out. (B, T, D)

        Positions start at `position_offset`: an int for every row, or a (B,) tensor of per-row
        starts (left-padded prompts; the pads then sit at negative positions, clamped to 0, and
        are masked anyway); `position_ids` (B, T) give every token its own. A rotary stack adds
        no positions here (its attention rotates queries and keys instead).
        """
        x = self.token_embedding(tokens) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        if self.positional_embedding is not None:
            length = x.shape[1]
            if position_ids is not None or torch.is_tensor(position_offset):
                index = position_ids if position_ids is not None else torch.arange(length, device=x.device) + position_offset[:, None]
                positions = self.positional_embedding[index.clamp(min=0)]  # (B, T, D)
            else:
                if position_offset + length > self.context_length:
                    raise ValueError(f"sequence of {position_offset + length} tokens exceeds the context length {self.context_length}")
                positions = self.positional_embedding[position_offset : position_offset + length]  # (T, D)
            x = x + positions.to(self.token_embedding.weight.dtype)  # (B, T, D)
        if self.type_embedding is not None:
            x = x + self.type_embedding(token_types if token_types is not None else torch.zeros_like(tokens))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.embed_dropout(x)

    def rotary(self, length: int, position_offset: int | torch.Tensor, position_ids: torch.Tensor | None,
               device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin), each (B or 1, T, Dh) in float32, of a rotary stack's positions; None for learned positions."""
        if self.positions != "rotary":
            return None
        if position_ids is None:
            offset = position_offset[:, None] if torch.is_tensor(position_offset) else position_offset
            position_ids = torch.arange(length, device=device)[None, :] + offset  # (B or 1, T)
        return rotary_angles(position_ids, self.head_dim, self.rope_theta)

    def forward(
        self,
        tokens: torch.Tensor | None,
        prefix_embeds: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        position_offset: int | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_layer_queries: int | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        decoder: bool = False,
        before_block=None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The last hidden state after the final norm, (B, N+T, D); with `output_hidden_states`
        also every block's input and output (before the final norm), as `(hidden, states)`.

        `prefix_embeds` (B, N, D) are put in front of the token embeddings as they are (image
        tokens: they carry their own positions). `position_offset` defaults to the number of
        cached positions, so a cached decoding step continues where the last one stopped; a stack
        that was given `prefix_embeds` passes it explicitly. `mask` is boolean (True = attend),
        broadcastable to (B, heads, N+T, K) with K = cached + new positions; `is_causal` with a
        `mask` ANDs causality into it (e.g. a padding mask over the keys of left-padded prompts).
        `inputs_embeds` (B, T, D) replace the token embeddings (positions are still added or
        rotated); `position_ids` (B, T) replace `position_offset`. In a rotary stack the positions
        run over the whole sequence, `prefix_embeds` included (`position_ids` is then (B, N+T)).
        `decoder=True` runs the blocks' decoder self-attention (see `TransformerBlock`);
        `before_block(index, x) -> x` runs before every block (see `Transformer.forward`).
        """
        past = cache.length if cache is not None else 0
        offset = past if position_offset is None else position_offset
        x = self.embed(tokens, offset, token_types, inputs_embeds=inputs_embeds, position_ids=position_ids)  # (B, T, D)
        if prefix_embeds is not None:
            x = torch.cat([prefix_embeds, x], dim=1)  # (B, N+T, D)
        rotary = self.rotary(x.shape[1], offset, position_ids, x.device)  # (B or 1, N+T, Dh) x 2, or None
        if is_causal and mask is not None:
            # SDPA takes a mask or is_causal, not both: fold causality in (queries are the last keys).
            # One query (a decoding step) is the last key itself and sees every key: nothing to fold.
            length = x.shape[1]
            if length > 1:
                mask = combine(causal_mask(length, past + length, device=x.device), mask)  # (B, 1, T, K)
            is_causal = False
        hidden = self.transformer(
            x, mask=mask, is_causal=is_causal, context=context, context_mask=context_mask, cache=cache,
            return_all=output_hidden_states, last_layer_queries=last_layer_queries, rotary=rotary, decoder=decoder,
            before_block=before_block,
        )
        x = self.final_norm(hidden[-1] if output_hidden_states else hidden)  # (B, N+T, D)
        return (x, hidden) if output_hidden_states else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from hidden states after the final norm. (B, T, V)"""
        if self.lm_head is not None:
            return self.lm_head(hidden)  # (B, T, V); a module call, so an adapted head (LoRA) counts
        return hidden @ self.token_embedding.weight.T  # (B, T, V)


class CoAttentionBlock(nn.Module):
    """One exchange between two streams (a: text, b: image): each stream's queries attend to the
    other stream's keys and values, both directions reading the block's inputs, then (optionally)
    each stream's own self-attention, then each stream's MLP:

        a1 = a + cross_a(a <- b)        b1 = b + cross_b(b <- a)        (co-attention)
        [a2 = a1 + self_a(a1)           b2 = b1 + self_b(b1)]           (self_attention=True)
        a3 = a2 + mlp_a(a2)             b3 = b2 + mlp_b(b2)

    with each residual post-LN (BERT, `prenorm=False`: norm(x + f(x))) or pre-LN. ViLBERT's
    co-attentional layer is the first and last rows (its streams' own self-attention layers are
    ordinary `TransformerBlock`s between these); LXMERT's cross-modality layer is all three rows
    with `shared_cross=True`: one attention module and its norm serve both directions (so the two
    widths must be equal), as in HF's `LxmertXLayer.visual_attention`. The attention's inner width
    is the querying stream's width (ViLBERT's separate `bi_hidden_size` is not modelled).

    Parameter names: `cross_a`, `norm_cross_a`, `cross_b`, `norm_cross_b` (or `cross`,
    `norm_cross` when shared), `attn_a`/`norm1_a`, `attn_b`/`norm1_b`, `mlp_a`/`norm2_a`, `mlp_b`/`norm2_b`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        other_dim: int | None = None,
        other_heads: int | None = None,
        mlp_ratio: float = 4.0,
        other_mlp_ratio: float | None = None,
        activation: str = "gelu",
        prenorm: bool = False,
        norm_eps: float = 1e-12,
        self_attention: bool = False,
        shared_cross: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        other_dim = other_dim or dim
        other_heads = other_heads or num_heads
        other_mlp_ratio = other_mlp_ratio or mlp_ratio
        if shared_cross and (other_dim != dim or other_heads != num_heads):
            raise ValueError("a shared cross-attention needs both streams at the same width and heads")
        self.prenorm, self.shared_cross, self.has_self_attention = prenorm, shared_cross, self_attention
        if shared_cross:
            self.cross = Attention(dim, num_heads, context_dim=dim, dropout=dropout)
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
        else:
            self.cross_a = Attention(dim, num_heads, context_dim=other_dim, dropout=dropout)
            self.norm_cross_a = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_b = Attention(other_dim, other_heads, context_dim=dim, dropout=dropout)
            self.norm_cross_b = nn.LayerNorm(other_dim, eps=norm_eps)
        if self_attention:
            self.attn_a, self.norm1_a = Attention(dim, num_heads, dropout=dropout), nn.LayerNorm(dim, eps=norm_eps)
            self.attn_b = Attention(other_dim, other_heads, dropout=dropout)
            self.norm1_b = nn.LayerNorm(other_dim, eps=norm_eps)
        self.mlp_a, self.norm2_a = MLP(dim, int(dim * mlp_ratio), activation), nn.LayerNorm(dim, eps=norm_eps)
        self.mlp_b = MLP(other_dim, int(other_dim * other_mlp_ratio), activation)
        self.norm2_b = nn.LayerNorm(other_dim, eps=norm_eps)
        self.residual_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        if self.prenorm:
            return x + self.residual_dropout(sublayer(norm(x)))
        return norm(x + self.residual_dropout(sublayer(x)))

    def _cross(self, x: torch.Tensor, norm: nn.Module, attention: Attention, context: torch.Tensor,
               context_mask: torch.Tensor | None) -> torch.Tensor:
        if self.prenorm:  # the context is the other stream as it is (it has its own norm in its own stream)
            return x + self.residual_dropout(attention(norm(x), context=context, mask=context_mask))
        return norm(x + self.residual_dropout(attention(x, context=context, mask=context_mask)))

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask_a: torch.Tensor | None = None,
                mask_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Streams a (B, Ta, Da) and b (B, Tb, Db); `mask_a` / `mask_b`: boolean key masks of each
        stream (True = attend), broadcastable to (B, heads, queries, keys), e.g. `padding_mask`.
        Returns the new (a, b)."""
        cross_a, norm_a = (self.cross, self.norm_cross) if self.shared_cross else (self.cross_a, self.norm_cross_a)
        cross_b, norm_b = (self.cross, self.norm_cross) if self.shared_cross else (self.cross_b, self.norm_cross_b)
        a, b = self._cross(a, norm_a, cross_a, b, mask_b), self._cross(b, norm_b, cross_b, a, mask_a)  # both read the inputs
        if self.has_self_attention:
            a = self._residual(a, self.norm1_a, lambda h: self.attn_a(h, mask=mask_a))  # (B, Ta, Da)
            b = self._residual(b, self.norm1_b, lambda h: self.attn_b(h, mask=mask_b))  # (B, Tb, Db)
        return self._residual(a, self.norm2_a, self.mlp_a), self._residual(b, self.norm2_b, self.mlp_b)
