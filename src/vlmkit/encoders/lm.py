"""The one decoder-only language model of the library: GPT-2 style or Llama style by its options,
with optional cross-attention to image (or any) context tokens.

    tokens (B, T) --embed_tokens--> (B, T, D)          or  inputs_embeds (B, T, D) given directly
    + learned positions (GPT-2)  |  rotary q/k in every attention (Llama)
    -> causal blocks [+ cross-attention to `context` (B, N, C) in every N-th block]
    -> final norm (B, T, D) -> LM head (tied to the token embedding, or its own) -> logits (B, T, V)

API the families build on (VirTex, SimVLM, the text-only `lm` family, Frozen, LLaVA, Flamingo, BLIP-2):

- `DecoderLM.from_config(lm: LMConfig, context_dim=None, cross_attention_every=1)` builds it from
  `encoders.config.LMConfig` (`lm_config_gpt2()` / `lm_config_llama()` give the two styles).
- `embed_tokens(tokens (B, T)) -> (B, T, D)`: the token embedding only, so a family can scatter
  image features or soft prompts into the sequence and pass the result as `inputs_embeds`.
- `forward(tokens=None, context=None, context_mask=None, mask=None, cache=None,
  position_offset=None, *, inputs_embeds=None, position_ids=None, attention_mask=None,
  output_hidden_states=False, return_hidden=False) -> logits (B, T, V)`:
  * exactly one of `tokens` (B, T) and `inputs_embeds` (B, T, D); positions are added (learned) or
    applied (rotary) to `inputs_embeds` exactly as to token embeddings (HF does the same);
  * positions: `position_ids` (B, T), or `position_offset` (an int, or (B,) per-row starts:
    left-padded rows start at minus their pad count), default the number of cached positions;
  * `attention_mask` (B, K) bool/0-1, True = a real key (HF's convention; K = cached + new
    positions), e.g. the pads of left-padded prompts; `mask`: any boolean mask broadcastable to
    (B, heads, T, K). Both are ANDed with causality. Without either, attention runs `is_causal`
    (the flash kernel on GPU);
  * `cache`: a `layers.attention.KVCache`, filled on the first call and extended on later ones
    (keys are cached already rotated, and grouped-query attention caches only its kv heads);
  * `return_hidden=True` returns the final-norm hidden states (B, T, D) instead of logits (pass
    the positions that need them to `logits(hidden)`); `output_hidden_states=True` returns
    `(out, states)` with every block's input and output (before the final norm);
  * `before_block(index, x) -> x` runs before every block: Flamingo inserts its gated
    cross-attention there, leaving the LM's own blocks untouched.

VirTex uses cross-attention to the CNN grid; `context=None` skips the cross-attention sublayers.
During decoding the cache holds every block's self-attention keys/values and the context's
keys/values (computed once), so a step costs one token's worth of compute.
"""
from __future__ import annotations

import torch

from vlmkit.layers.attention import KVCache
from vlmkit.layers.masks import combine, padding_mask
from vlmkit.layers.transformer import TokenTransformer


class DecoderLM(TokenTransformer):
    """Causal transformer LM; `cross_attention_every=N` puts a cross-attention sublayer in blocks N-1, 2N-1, ...

    The keyword options after `dropout` are the Llama style's (see `TokenTransformer`); their
    defaults are GPT-2's stack, which VirTex and SimVLM use.
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
        context_dim: int | None = None,
        cross_attention_every: int = 1,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        *,
        norm: str = "layernorm",
        positions: str = "learned",
        kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        gated_mlp: bool = False,
        bias: bool = True,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__(
            vocab_size, context_length, width, depth, heads, mlp_ratio=mlp_ratio, activation=activation,
            norm_eps=norm_eps, dropout=dropout, context_dim=context_dim, cross_attention_every=cross_attention_every,
            tie_embeddings=tie_embeddings, norm=norm, positions=positions, kv_heads=kv_heads, mlp_hidden=mlp_hidden,
            gated_mlp=gated_mlp, bias=bias, rope_theta=rope_theta,
        )

    @classmethod
    def from_config(cls, lm, context_dim: int | None = None, cross_attention_every: int = 1) -> "DecoderLM":
        """The LM an `encoders.config.LMConfig` describes (cross-attention to `context_dim` features if given)."""
        return cls(
            lm.vocab_size, lm.context_length, lm.width, lm.depth, lm.heads, activation=lm.activation,
            context_dim=context_dim, cross_attention_every=cross_attention_every, tie_embeddings=lm.tie_embeddings,
            norm_eps=lm.norm_eps, dropout=lm.dropout, norm=lm.norm, positions=lm.positions, kv_heads=lm.kv_heads,
            mlp_hidden=lm.hidden, gated_mlp=lm.gated_mlp, bias=lm.bias, rope_theta=lm.rope_theta,
        )

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_offset: int | torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_hidden: bool = False,
        before_block=None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, T, V) of the next token at every position of `tokens` (B, T) or `inputs_embeds` (B, T, D).

        See the module docstring for every argument. `mask` / `attention_mask` cover the keys
        (cached + new); causality is always applied.
        """
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of tokens and inputs_embeds")
        if attention_mask is not None:
            mask = combine(mask, padding_mask(attention_mask))  # (B, 1, 1, K)
        out = super().forward(tokens, position_offset=position_offset, mask=mask, is_causal=True, context=context,
                              context_mask=context_mask, cache=cache, output_hidden_states=output_hidden_states,
                              inputs_embeds=inputs_embeds, position_ids=position_ids, before_block=before_block)
        hidden, states = out if output_hidden_states else (out, None)  # (B, T, D)
        result = hidden if return_hidden else self.logits(hidden)  # (B, T, D) or (B, T, V)
        return (result, states) if output_hidden_states else result


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


def random_prefixed_batch(image_size: int, lm, num_prefix_tokens: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A dummy batch of a family that puts `num_prefix_tokens` image embeddings in front of the LM's
    tokens: random pixels (B, 3, S, S) and random texts (B, L), L leaving the prefix room in the context."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    end = lm.eos_token_id if lm.eos_token_id is not None else lm.vocab_size - 1
    tokens = random_tokens(lm.vocab_size, min(lm.context_length - num_prefix_tokens, 24), end, lm.pad_token_id,
                           batch_size, generator)
    return {"pixels": pixels, "tokens": tokens}


def random_texts(text, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """`random_tokens` shaped by a TextConfig, ended by its eos token (the last id for towers without one). (B, L)"""
    end = text.eos_token_id if text.eos_token_id is not None else text.vocab_size - 1
    return random_tokens(text.vocab_size, text.context_length, end, text.pad_token_id, batch_size, generator)
