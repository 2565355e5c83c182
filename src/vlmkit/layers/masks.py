"""Attention masks, all as booleans where True means "may attend" (SDPA's convention).

Shapes: a mask for queries of length Q over keys of length K is (Q, K), or (B, 1, Q, K) when
it differs per sample, so it broadcasts over heads. Each builder follows its paper's
definition and is tested token by token in tests/test_masks.py.
"""
from __future__ import annotations

import torch


def causal_mask(num_queries: int, num_keys: int | None = None, device=None) -> torch.Tensor:
    """Query i sees keys j <= i + (K - Q) (the last Q keys are the queries themselves). (Q, K)"""
    num_keys = num_queries if num_keys is None else num_keys
    offset = num_keys - num_queries  # keys already in a KV cache
    query = torch.arange(num_queries, device=device)[:, None]
    key = torch.arange(num_keys, device=device)[None, :]
    return key <= query + offset


def padding_mask(key_is_real: torch.Tensor) -> torch.Tensor:
    """From a (B, K) bool/int "real token" mask to a (B, 1, 1, K) attention mask."""
    return key_is_real.bool()[:, None, None, :]


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """PrefixLM (SimVLM): bidirectional over the first `prefix_lengths[b]` positions, causal after.

    Query i may attend key j iff j < prefix_len or j <= i. (B, 1, L, L)
    """
    positions = torch.arange(seq_len, device=prefix_lengths.device)
    query = positions[None, :, None]  # (1, L, 1)
    key = positions[None, None, :]  # (1, 1, L)
    in_prefix = key < prefix_lengths[:, None, None]  # (B, 1, L)
    return (in_prefix | (key <= query))[:, None]  # (B, 1, L, L)


def real_tokens_through_end(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, L) bool: True up to and including the first end token (what an LM is trained on).

    Padding is found from the end token, not by comparing with the pad id, because a trained
    CLIP-style BPE pads with id 0, which is also a real byte token.
    """
    is_end = tokens == eos_token_id
    return (is_end.long().cumsum(dim=1) - is_end.long()) == 0  # (B, L)


def combine(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """Logical AND of broadcastable boolean masks; None entries are ignored."""
    present = [mask for mask in masks if mask is not None]
    if not present:
        return None
    result = present[0]
    for mask in present[1:]:
        result = result & mask
    return result


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where allowed, -inf-like where not)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


QFORMER_MASKS = ("itc", "itm", "itg")


def qformer_mask(kind: str, num_queries: int, text_is_real: torch.Tensor) -> torch.Tensor:
    """BLIP-2's three Q-Former masks over [queries ; text], (B, 1, Nq+T, Nq+T) (Li et al. 2023, fig. 2).

    `text_is_real` (B, T) marks real text tokens (pads are never keys). Queries are always real.
      itc  unimodal: queries see only queries, text sees only text (the two ITC passes in one)
      itm  bi-directional: every token sees every real token
      itg  multimodal causal: text token i sees every query and text tokens j <= i; queries never see text
    """
    if kind not in QFORMER_MASKS:
        raise ValueError(f"unknown Q-Former mask '{kind}'; use one of {', '.join(QFORMER_MASKS)}")
    batch, length = text_is_real.shape
    total = num_queries + length
    positions = torch.arange(total, device=text_is_real.device)
    row, key = positions[:, None], positions[None, :]  # (L, 1), (1, L)
    query_row, query_key = row < num_queries, key < num_queries
    if kind == "itm":
        allowed = torch.ones(total, total, dtype=torch.bool, device=text_is_real.device)
    elif kind == "itc":
        allowed = query_row == query_key
    else:  # itg
        allowed = torch.where(query_row, query_key, query_key | (key <= row))
    key_is_real = torch.cat([text_is_real.new_ones(batch, num_queries).bool(), text_is_real.bool()], dim=1)  # (B, L)
    return (allowed[None] & key_is_real[:, None, :])[:, None]  # (B, 1, L, L)


def text_to_image_mask(num_text: int, num_image: int, text_is_real: torch.Tensor | None = None,
                       device=None) -> torch.Tensor:
    """DALL-E's decoder mask over [text tokens ; image tokens] (Ramesh et al. 2021, section 2.2).

    Text token i sees text tokens j <= i (and no image token); image token i sees every text token
    and the image tokens j <= i. That is the causal mask of the whole sequence, written from its
    definition so the equivalence is tested rather than assumed. With `text_is_real` (B, T) the
    text pads are hidden from every query (but a pad still sees itself, so no row is empty); DALL-E
    itself gives each pad position a token of its own and keeps them visible (text_is_real=None).
    (T+N, T+N), or (B, 1, T+N, T+N) with `text_is_real`.
    """
    total = num_text + num_image
    positions = torch.arange(total, device=device)
    query, key = positions[:, None], positions[None, :]  # (L, 1), (1, L)
    query_is_text, key_is_text = query < num_text, key < num_text
    text_rows = key_is_text & (key <= query)
    image_rows = key_is_text | (key <= query)
    allowed = torch.where(query_is_text, text_rows, image_rows)  # (L, L)
    if text_is_real is None:
        return allowed
    batch = text_is_real.shape[0]
    key_is_real = torch.cat([text_is_real.bool(), text_is_real.new_ones(batch, num_image).bool()], dim=1)  # (B, L)
    visible = allowed[None] & (key_is_real[:, None, :] | (key == query)[None])  # (B, L, L)
    return visible[:, None]  # (B, 1, L, L)


def media_mask(media_locations: torch.Tensor, num_media: int, tokens_per_media: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flamingo's media mask (Alayrac et al. 2022, sec. 2.1; OpenFlamingo's `only_attend_immediate_media`).

    `media_locations` (B, T) marks the `<image>` tokens. Each text token attends only to the
    visual tokens of the most recent image at or before it (the `<image>` token itself belongs to
    its image); tokens before the first image attend to none. Media of a row are laid out one
    image after the other, `tokens_per_media` each: keys (B, num_media * tokens_per_media).

    Returns `(mask (B, 1, T, num_media * tokens_per_media), attends_any (B, T))`. A token that
    attends to no image gets an all-True mask row (so softmax never sees an empty row and gives
    no NaN); its cross-attention output must be zeroed with `attends_any`, as IDEFICS's
    `cross_attention_gate` does.
    """
    text_time = media_locations.long().cumsum(dim=1)  # (B, T): 1-based index of the latest image, 0 before any
    media_time = torch.arange(1, num_media + 1, device=media_locations.device)  # (N,)
    allowed = text_time[:, :, None] == media_time[None, None, :]  # (B, T, N)
    attends_any = text_time > 0  # (B, T)
    allowed = allowed | ~attends_any[:, :, None]
    return allowed.repeat_interleave(tokens_per_media, dim=2)[:, None], attends_any  # (B, 1, T, N*L), (B, T)
