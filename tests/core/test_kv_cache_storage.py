"""The KV cache's growing storage and grouped-query attention with masks (the decoding speed paths)."""
import torch

from vlmkit.layers.attention import Attention, KVCache, LayerCache, reference_attention
from vlmkit.layers.masks import causal_mask, padding_mask


def test_appended_keys_equal_concatenation_across_growth_and_reorder():
    torch.manual_seed(0)
    cache, steps = LayerCache(), [torch.randn(3, 2, 5, 4)] + [torch.randn(3, 2, 1, 4) for _ in range(80)]
    values = [step * 2 for step in steps]
    for count, (key, value) in enumerate(zip(steps, values), start=1):
        keys, vals = cache.append(key, value)
        assert torch.equal(keys, torch.cat(steps[:count], dim=2)) and torch.equal(vals, torch.cat(values[:count], dim=2))
    assert cache.length == 85 and cache.storage[0].shape[2] >= 85  # grown past its first capacity (5 + 64)
    order = torch.tensor([2, 2, 0])
    cache.reorder(order)
    assert torch.equal(cache.key, torch.cat(steps, dim=2)[order]) and torch.equal(cache.value, torch.cat(values, dim=2)[order])
    keys, _ = cache.append(steps[1][order], values[1][order])  # appends after a reorder land in the new rows
    assert torch.equal(keys[:, :, -1:], steps[1][order])


def test_appending_under_autograd_keeps_backward_valid():
    attention = Attention(16, 4, kv_heads=2)
    x = torch.randn(2, 6, 16, requires_grad=True)
    cache = KVCache()
    outputs = [attention(x[:, :3], is_causal=True, cache=cache.layer("a"))]
    outputs += [attention(x[:, t : t + 1], is_causal=True, cache=cache.layer("a")) for t in range(3, 6)]
    torch.cat(outputs, dim=1).sum().backward()  # no in-place write invalidated a saved tensor
    expected = torch.autograd.grad(attention(x, is_causal=True).sum(), x)[0]
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_grouped_query_attention_with_a_padding_mask_matches_the_definition():
    torch.manual_seed(0)
    attention = Attention(32, 8, kv_heads=2).eval()
    x = torch.randn(2, 7, 32)
    real = torch.arange(7)[None] >= torch.tensor([[0], [3]])  # row 1 left-padded by 3
    mask = causal_mask(7) & padding_mask(real)  # (B, 1, T, T)
    with torch.no_grad():
        out = attention(x, mask=mask)
        query, key, value = attention._split_qkv(attention.qkv(x))
        expected = reference_attention(query, key.repeat_interleave(4, dim=1), value.repeat_interleave(4, dim=1), mask=mask)
        expected = attention.out(expected.transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(out[real], expected[real], atol=1e-5)
