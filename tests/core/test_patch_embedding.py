"""The ViT patchify as a matmul (layers.patch.PatchEmbedding) is the strided convolution it replaces."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.layers.patch import PatchEmbedding


@pytest.mark.parametrize("size, patch, bias", [((64, 64), 8, False), ((70, 53), 8, True), ((42, 42), 14, True)])
def test_patch_embedding_is_the_strided_convolution(size, patch, bias):
    torch.manual_seed(0)
    layer = PatchEmbedding(3, 32, patch, bias=bias)
    conv = nn.Conv2d(3, 32, patch, stride=patch, bias=bias)
    conv.load_state_dict(layer.state_dict())  # same parameters, same keys
    assert list(layer.state_dict()) == list(conv.state_dict())
    pixels = torch.randn(2, 3, *size)
    ours_in, theirs_in = pixels.clone().requires_grad_(), pixels.clone().requires_grad_()
    ours, theirs = layer(ours_in), conv(theirs_in)  # (B, 32, H // p, W // p): leftover rows/columns dropped alike
    assert ours.shape == theirs.shape == (2, 32, size[0] // patch, size[1] // patch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(ours)
    ours.backward(upstream)
    theirs.backward(upstream)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, conv.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, conv.bias.grad, atol=1e-4, rtol=1e-5)


def test_patch_embedding_output_flattens_to_tokens_without_a_copy():
    torch.manual_seed(0)
    layer = PatchEmbedding(3, 16, 8)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = layer(pixels).flatten(2).transpose(1, 2)  # (B, N, W): what the ViT takes, a view of the matmul's result
    assert tokens.is_contiguous()
    expected = F.conv2d(pixels, layer.weight, stride=8).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
