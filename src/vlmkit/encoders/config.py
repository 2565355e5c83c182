"""Tower configurations shared by every family, and the builders that turn them into modules."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmkit.errors import UserError


@dataclass
class VisionConfig:
    """An image tower: a ViT (optionally with a conv stem) or CLIP's modified ResNet."""

    type: str = "vit"  # vit | resnet
    image_size: int = 224
    patch_size: int = 32
    width: int = 768  # ViT width; for a ResNet, the stem width (64 for RN50)
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    activation: str = "gelu"  # quick_gelu for OpenAI weights
    conv_stem: tuple[int, ...] = ()  # channels of stride-2 conv stages before patchify (hybrid ViT)
    pool: str = "cls"  # cls | mean
    norm_pre: bool = True  # CLIP's ln_pre
    norm_eps: float = 1e-5
    layer_scale: float | None = None
    drop_path: float = 0.0
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)


@dataclass
class TextConfig:
    """A text tower: causal (CLIP/GPT-like) or bidirectional (BERT-like)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = True
    pool: str = "eos"  # eos (first end token) | argmax (highest id) | cls | mean
    eos_token_id: int | None = 49407
    pad_token_id: int = 0
    prenorm: bool = True  # False = BERT's post-LN blocks
    embed_norm: bool = False  # BERT's embedding LayerNorm
    type_vocab_size: int = 0  # BERT's token-type embeddings
    norm_eps: float = 1e-5
    dropout: float = 0.0


def build_vision_tower(config: VisionConfig, output_dim: int | None) -> nn.Module:
    """The image tower a config describes, with a projection to `output_dim` (None = no projection)."""
    if config.type == "vit":
        from vlmkit.encoders.vit import VisionTransformer

        return VisionTransformer(
            image_size=config.image_size, patch_size=config.patch_size, width=config.width, depth=config.depth,
            heads=config.heads, output_dim=output_dim, mlp_ratio=config.mlp_ratio, activation=config.activation,
            conv_stem=tuple(config.conv_stem), pool=config.pool, norm_pre=config.norm_pre, norm_eps=config.norm_eps,
            layer_scale=config.layer_scale, drop_path=config.drop_path,
        )
    if config.type == "resnet":
        from vlmkit.encoders.resnet import ModifiedResNet

        return ModifiedResNet(
            layers=tuple(config.resnet_layers), output_dim=output_dim, heads=config.heads,
            image_size=config.image_size, width=config.width,
        )
    raise UserError(f"unknown vision tower type '{config.type}'; use 'vit' or 'resnet'")


def build_text_tower(config: TextConfig, output_dim: int | None) -> nn.Module:
    """The text tower a config describes, with a projection to `output_dim` (None = no projection)."""
    from vlmkit.encoders.text import TextTransformer

    return TextTransformer(
        vocab_size=config.vocab_size, context_length=config.context_length, width=config.width, depth=config.depth,
        heads=config.heads, output_dim=output_dim, mlp_ratio=config.mlp_ratio, activation=config.activation,
        causal=config.causal, pool=config.pool, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        prenorm=config.prenorm, embed_norm=config.embed_norm, type_vocab_size=config.type_vocab_size,
        norm_eps=config.norm_eps, dropout=config.dropout,
    )
