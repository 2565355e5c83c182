"""Attention on SDPA equals softmax(QK^T/sqrt(d))V for every mask kind; the KV cache changes nothing."""
import pytest
import torch

from vlmkit.layers.attention import Attention, KVCache, reference_attention
from vlmkit.layers.masks import causal_mask, combine, padding_mask, prefix_lm_mask, to_additive


def _explicit(attention: Attention, x, mask=None, is_causal=False, context=None):
    if attention.is_cross:
        query = attention._heads(attention.q(x), 1)[0]
        key, value = attention._heads(attention.kv(context), 2)
    else:
        query, key, value = attention._heads(attention.qkv(x), 3)
    out = reference_attention(query, key, value, mask=mask, is_causal=is_causal)
    return attention.out(out.transpose(1, 2).reshape(x.shape))


def _masks(batch, length):
    lengths = torch.tensor([length, length - 3])
    real = torch.arange(length)[None] < lengths[:, None]
    prefix = torch.tensor([2, 5])
    return {
        "none": (None, False),
        "causal": (None, True),
        "causal_explicit": (causal_mask(length), False),
        "padding": (padding_mask(real), False),
        "prefix_lm": (prefix_lm_mask(prefix, length), False),
        "prefix_lm_and_padding": (combine(prefix_lm_mask(prefix, length), padding_mask(real)), False),
        "additive_padding": (to_additive(padding_mask(real), torch.float32), False),
    }


@pytest.mark.parametrize("kind", list(_masks(2, 9)))
def test_self_attention_matches_explicit_formula(kind):
    torch.manual_seed(0)
    attention = Attention(32, 4).eval()
    x = torch.randn(2, 9, 32)
    mask, is_causal = _masks(2, 9)[kind]
    got = attention(x, mask=mask, is_causal=is_causal)
    want = _explicit(attention, x, mask=mask, is_causal=is_causal)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_cross_attention_matches_explicit_formula_with_context_padding():
    torch.manual_seed(0)
    attention = Attention(32, 4, context_dim=24).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    mask = padding_mask(torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    got = attention(x, context=context, mask=mask)
    assert torch.allclose(got, _explicit(attention, x, mask=mask, context=context), atol=1e-5)


def test_masked_keys_have_no_influence():
    torch.manual_seed(0)
    attention = Attention(16, 2).eval()
    x = torch.randn(1, 6, 16)
    mask = padding_mask(torch.tensor([[1, 1, 1, 1, 0, 0]]))
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 16) * 10
    assert torch.allclose(attention(x, mask=mask)[:, :4], attention(changed, mask=mask)[:, :4], atol=1e-6)


def test_kv_cache_decoding_equals_full_causal_pass():
    torch.manual_seed(0)
    attention = Attention(32, 4).eval()
    x = torch.randn(2, 8, 32)
    full = attention(x, is_causal=True)
    cache = KVCache()
    prompt = attention(x[:, :3], is_causal=True, cache=cache.layer("a"))
    steps = [attention(x[:, i : i + 1], is_causal=True, cache=cache.layer("a")) for i in range(3, 8)]
    assert torch.allclose(torch.cat([prompt, *steps], dim=1), full, atol=1e-5)
    assert cache.length == 8


def test_cross_attention_cache_computes_keys_once():
    torch.manual_seed(0)
    attention = Attention(16, 2, context_dim=16).eval()
    context = torch.randn(1, 4, 16)
    cache = KVCache().layer("x.cross")
    first = attention(torch.randn(1, 1, 16), context=context, cache=cache)
    key = cache.key
    second_query = torch.randn(1, 1, 16)
    cached = attention(second_query, context=torch.zeros_like(context), cache=cache)  # context ignored once cached
    assert cache.key is key
    assert torch.allclose(cached, attention(second_query, context=context), atol=1e-6)
    assert first.shape == (1, 1, 16)
