"""Multi-head attention on `F.scaled_dot_product_attention`, with a KV cache for decoding.

Self-attention uses one fused QKV projection; cross-attention projects queries from `x` and
keys/values from `context` (fused KV). Masks are boolean (True = attend) or additive floats,
broadcastable to (B, heads, Q, K). During decoding a `LayerCache` keeps this layer's keys and
values: self-attention appends the new step's, cross-attention computes them once.

Grouped-query attention (`kv_heads` < `num_heads`, Llama 2/3): the fused projection has
(heads + 2 * kv_heads) * head_dim outputs, rows [q; k; v]; query head h reads key/value head
h // (heads / kv_heads). The cache keeps the kv_heads keys and values only. Rotary positions
(`rotary=(cos, sin)`, see layers.rotary) rotate q and k before the keys enter the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.layers.rotary import apply_rotary

# SDPA's `enable_gqa` (torch >= 2.5) reads grouped keys without copying them. On the GPU only the flash
# and math kernels take it, so with a mask it would fall back to math: masked GPU calls expand k/v
# instead (as HF's sdpa_attention does). The CPU kernels take it with a mask too, and copying the
# cached k/v for every layer of every decoding step (left-padded prompts carry a mask) costs more
# than the attention itself.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass
class LayerCache:
    """Keys and values of one attention layer kept between decoding steps. (B, H, T, Dh)

    Self-attention adds each step's keys with `append`: they are written into preallocated storage
    (`key` / `value` are views of its first T positions) that grows by half its size, at least 64
    positions, when full, so a decoding step copies only its own keys rather than the whole cache
    (as `torch.cat` would, every layer, every step). Cross-attention sets `key` / `value` once.
    """

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    storage: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add keys and values (B, H, t, Dh) after the cached ones; returns all of them (B, H, T + t, Dh)."""
        if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
            # Under autograd, in-place writes would invalidate the views earlier steps saved for backward.
            if self.key is not None:
                key, value = torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2)
            self.key, self.value, self.storage = key, value, None
            return key, value
        past, total = self.length, self.length + key.shape[2]
        if self.storage is None or self.storage[0].shape[2] < total:
            capacity = total + max(64, total // 2)
            storage = tuple(new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3]) for new in (key, value))
            if past:
                storage[0][:, :, :past], storage[1][:, :, :past] = self.key, self.value
            self.storage = storage
        stored_key, stored_value = self.storage
        stored_key[:, :, past:total], stored_value[:, :, past:total] = key, value
        self.key, self.value = stored_key[:, :, :total], stored_value[:, :, :total]
        return self.key, self.value

    def reorder(self, beam_indices: torch.Tensor) -> None:
        """Keep the rows of the surviving beams (beam search)."""
        if self.storage is not None:
            length = self.length
            self.storage = tuple(stored.index_select(0, beam_indices) for stored in self.storage)
            self.key, self.value = (stored[:, :, :length] for stored in self.storage)
        elif self.key is not None:
            self.key = self.key.index_select(0, beam_indices)
            self.value = self.value.index_select(0, beam_indices)


class KVCache:
    """One `LayerCache` per attention layer of a model, created on first use."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerCache] = {}

    def layer(self, name: str) -> LayerCache:
        if name not in self.layers:
            self.layers[name] = LayerCache()
        return self.layers[name]

    def reorder(self, beam_indices: torch.Tensor) -> None:
        for cache in self.layers.values():
            cache.reorder(beam_indices)

    @property
    def length(self) -> int:
        """Number of cached self-attention positions (0 before the first step)."""
        lengths = [cache.length for name, cache in self.layers.items() if not name.endswith(".cross")]
        return lengths[0] if lengths else 0


class Attention(nn.Module):
    """Multi-head self-attention (fused QKV) or cross-attention (separate Q, fused KV); `kv_heads`
    < `num_heads` makes it grouped-query attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        kv_heads = num_heads if kv_heads is None else kv_heads
        if kv_heads < 1 or num_heads % kv_heads:
            raise ValueError(f"{kv_heads} key/value heads do not divide {num_heads} heads")
        self.num_heads, self.kv_heads = num_heads, kv_heads
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        self.dropout = dropout
        kv_dim = kv_heads * self.head_dim
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * kv_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim + 2 * kv_dim, bias=qkv_bias)
            # Named output slices of the fused projection: LoRA targets such as "attn.qkv:q,v" find their rows.
            self.qkv.lora_slices = {"q": (0, dim), "k": (dim, dim + kv_dim), "v": (dim + kv_dim, dim + 2 * kv_dim)}
        self.out = nn.Linear(dim, dim, bias=out_bias)

    def _heads(self, x: torch.Tensor, parts: int, heads: int | None = None) -> tuple[torch.Tensor, ...]:
        batch, length, _ = x.shape
        # (B, T, parts*heads*Dh) -> parts x (B, heads, T, Dh)
        x = x.view(batch, length, parts, heads or self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return x.unbind(0)

    def context_keys(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A cross-attention layer's keys and values of `context` (B, N, C), each (B, KV, N, Dh), as
        `forward` computes them: a caller that attends to the same context several times (BLIP-2's
        three stage-1 passes over one image) projects it once and passes them in a `LayerCache`."""
        # split, not a permute + unbind: the backward is one concatenation of the two gradients
        key, value = self.kv(context).split(self.kv_heads * self.head_dim, dim=-1)
        return self._to_heads(key, self.kv_heads), self._to_heads(value, self.kv_heads)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused projections (B, T, (H + 2KV) Dh) -> q (B, H, T, Dh), k and v (B, KV, T, Dh).

        One `split` along the features: its backward is a single concatenation of the three
        gradients, where slicing (or a permute + unbind) costs zero-filled copies and a sum.
        """
        kv_dim = self.kv_heads * self.head_dim
        query, key, value = qkv.split([qkv.shape[-1] - 2 * kv_dim, kv_dim, kv_dim], dim=-1)
        return self._to_heads(query, self.num_heads), self._to_heads(key, self.kv_heads), self._to_heads(value, self.kv_heads)

    def _to_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, T, heads*Dh) -> (B, heads, T, Dh), a view (the last dimension of a split is still unit-stride)."""
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def _attend(self, query, key, value, mask, is_causal: bool) -> torch.Tensor:
        """SDPA over grouped keys/values: native GQA where the kernel takes it, expanded k/v otherwise."""
        gqa = {}
        if self.kv_heads != self.num_heads:
            if _SDPA_GQA and (mask is None or query.device.type == "cpu"):
                gqa = {"enable_gqa": True}
            else:
                groups = self.num_heads // self.kv_heads
                key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # (B, H, K, Dh)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None, **gqa,
        )  # (B, H, T, Dh)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: LayerCache | None = None,
        num_queries: int | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`num_queries`: only the first N positions ask (all positions still give keys and values);
        used when only the [CLS] output of a last layer is needed. `rotary`: (cos, sin), each
        (B or 1, T, Dh), rotating this step's queries and keys (self-attention only). Output (B, N or T, D)."""
        batch, length, dim = x.shape  # (B, T, D)
        if num_queries is not None and not self.is_cross and cache is None and not is_causal:
            if type(self.qkv) is nn.Linear:
                # Slices of the fused weight: keys/values for every position, queries for the first N.
                weight, bias = self.qkv.weight, self.qkv.bias
                key, value = self._heads(F.linear(x, weight[dim:], None if bias is None else bias[dim:]), 2, self.kv_heads)
                (query,) = self._heads(F.linear(x[:, :num_queries], weight[:dim], None if bias is None else bias[:dim]), 1)
            else:  # an adapted projection (LoRA) is more than its weight: project all, keep N queries
                query, key, value = self._split_qkv(self.qkv(x))
                query = query[:, :, :num_queries]  # (B, H, N, Dh)
            if rotary is not None:
                cos, sin = rotary
                query, key = apply_rotary(query, cos[:, :num_queries], sin[:, :num_queries]), apply_rotary(key, cos, sin)
            out = self._attend(query, key, value, mask, is_causal=False)
            return self.out(out.transpose(1, 2).reshape(batch, num_queries, dim))  # (B, N, D)
        if self.is_cross:
            (query,) = self._heads(self.q(x), 1)
            if cache is not None and cache.key is not None:
                key, value = cache.key, cache.value  # image keys/values computed once per generation
            else:
                key, value = self.context_keys(context)
                if cache is not None:
                    cache.key, cache.value = key, value
        else:
            query, key, value = self._split_qkv(self.qkv(x))  # (B, H, T, Dh), (B, KV, T, Dh) x 2
            if rotary is not None:  # keys are cached rotated: a cached key keeps its own position
                cos, sin = rotary
                query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
            if cache is not None:
                key, value = cache.append(key, value)  # (B, KV, past + T, Dh) x 2
                if is_causal and mask is None and key.shape[2] != length:
                    if length == 1:  # one new query (a decoding step) sees every cached key: no mask needed
                        is_causal = False
                    else:  # causal with a cache: the new queries sit at the end of the key sequence
                        from vlmkit.layers.masks import causal_mask

                        mask, is_causal = causal_mask(length, key.shape[2], device=x.device), False
        out = self._attend(query, key, value, mask, is_causal)  # (B, H, T, Dh)
        out = out.transpose(1, 2).reshape(batch, length, dim)  # (B, T, D)
        return self.out(out)


def reference_attention(query, key, value, mask=None, is_causal=False) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + mask) V written out, the definition tests compare SDPA against."""
    scores = query @ key.transpose(-2, -1) / query.shape[-1] ** 0.5  # (B, H, Q, K)
    if is_causal:
        from vlmkit.layers.masks import causal_mask

        scores = scores.masked_fill(~causal_mask(query.shape[-2], key.shape[-2], scores.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1) @ value
