"""Vision Transformer tower (CLIP/OpenCLIP layout), optionally with a conv stem (SimVLM's hybrid).

pixels (B, 3, H, W) -> [conv stem] -> patchify -> [CLS] + positions -> ln_pre -> blocks
-> ln_post(CLS or mean) @ proj. `forward` returns the pooled vector and the token features,
which captioners and LLM connectors consume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.layers.patch import PatchEmbedding, resample_grid_positions
from vlmkit.layers.transformer import Transformer


@dataclass
class VisionOutput:
    pooled: torch.Tensor  # (B, output_dim): the image embedding before normalisation
    tokens: torch.Tensor  # (B, T, width): last hidden state (ViT) or grid features (ResNet)
    hidden_states: list[torch.Tensor] | None = None  # every layer's output, when asked


class ConvStem(nn.Module):
    """Stride-2 conv-BN-ReLU stages before patchify: the hybrid CNN+ViT of SimVLM/ViT-R."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers, previous = [], 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            previous = width
        self.layers = nn.Sequential(*layers)
        self.out_channels = previous
        self.stride = 2 ** len(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        output_dim: int | None,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        conv_stem: tuple[int, ...] = (),
        pool: str = "cls",
        norm_pre: bool = True,
        norm_eps: float = 1e-5,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        patch_bias: bool = False,
    ) -> None:
        super().__init__()
        self.stem = ConvStem(tuple(conv_stem)) if conv_stem else None
        stride = self.stem.stride if self.stem else 1
        if patch_size % stride:
            raise ValueError(f"patch size {patch_size} must be a multiple of the conv stem's stride {stride}")
        in_channels = self.stem.out_channels if self.stem else 3
        self.patch_size = patch_size
        self.patch_embed = PatchEmbedding(in_channels, width, patch_size // stride,
                                          bias=patch_bias)  # CLIP has no bias here, timm / BLIP ViTs do
        self.grid = image_size // patch_size
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(self.grid**2 + 1, width) * width**-0.5)
        self.norm_pre = nn.LayerNorm(width, eps=norm_eps) if norm_pre else nn.Identity()
        self.transformer = Transformer(
            width, depth, heads, mlp_ratio=mlp_ratio, activation=activation, norm_eps=norm_eps,
            layer_scale=layer_scale, drop_path=drop_path,
        )
        self.norm_post = nn.LayerNorm(width, eps=norm_eps)
        self.pool = pool
        self.proj = nn.Linear(width, output_dim, bias=False) if output_dim else nn.Identity()
        self.width = width

    @torch.no_grad()
    def init_openclip(self) -> None:
        """OpenCLIP's initialisation of its ViT, which is PyTorch's `nn.MultiheadAttention` one.

        Xavier-uniform fused in-projection, zero attention biases (in and out), and an output
        projection drawn like OpenCLIP's `proj` parameter (normal, std width**-0.5); the MLP, the
        patch convolution and the norms keep PyTorch's defaults, as in OpenCLIP. Measured on real
        images (docs/clip_vs_openclip.md), the default Linear init with uniform biases learns slower.
        """
        for block in self.transformer.blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            for bias in (block.attn.qkv.bias, block.attn.out.bias):
                if bias is not None:
                    nn.init.zeros_(bias)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=self.width**-0.5)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens with [CLS] and positions, before the blocks. (B, 1+N, W)"""
        x = self.stem(pixels) if self.stem else pixels
        x = self.patch_embed(x)  # (B, W, gh, gw)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, W)
        positions = self.positional_embedding
        if tuple(grid) != (self.grid, self.grid):
            positions = resample_grid_positions(positions, tuple(grid))
        return x + positions.to(x.dtype)

    def hidden_state(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """`forward(pixels, output_hidden_states=True).hidden_states[layer]` (0: the embeddings after
        `norm_pre`, k: block k's output, negative from the end), running only the blocks up to it. (B, 1+N, W)"""
        states = len(self.transformer.blocks) + 1
        if not -states <= layer < states:
            raise ValueError(f"layer {layer} is outside the {states} hidden states of this tower")
        x = self.norm_pre(self.embed(pixels))  # (B, 1+N, W)
        return self.transformer(x, num_blocks=layer % states)

    def forward(self, pixels: torch.Tensor, output_hidden_states: bool = False, pooled_only: bool = False) -> VisionOutput:
        """`pooled_only`: the caller needs only `pooled`, so with [CLS] pooling the last block
        computes the [CLS] row alone (exact; `tokens` is then just that row)."""
        x = self.norm_pre(self.embed(pixels))  # (B, 1+N, W)
        cls_only = pooled_only and self.pool == "cls" and not output_hidden_states
        hidden = self.transformer(x, return_all=output_hidden_states, last_layer_queries=1 if cls_only else None)
        tokens = hidden[-1] if output_hidden_states else hidden  # (B, 1+N, W)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)  # (B, W)
        pooled = self.proj(self.norm_post(pooled))  # (B, D)
        return VisionOutput(pooled=pooled, tokens=tokens, hidden_states=hidden if output_hidden_states else None)
