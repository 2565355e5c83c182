"""Tower configurations shared by every family, and the builders that turn them into modules."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmkit.config import bounded, check_fields
from vlmkit.errors import UserError


@dataclass
class VisionConfig:
    """An image tower: a ViT (optionally with a conv stem) or CLIP's modified ResNet."""

    type: str = "vit"  # vit | resnet
    image_size: int = bounded(224, low=1)
    patch_size: int = bounded(32, low=1)
    width: int = bounded(768, low=1)  # ViT width; for a ResNet, the stem width (64 for RN50)
    depth: int = bounded(12, low=0)
    heads: int = bounded(12, low=1)
    mlp_ratio: float = bounded(4.0, low=0, low_open=True)
    activation: str = "gelu"  # quick_gelu for OpenAI weights
    conv_stem: tuple[int, ...] = ()  # channels of stride-2 conv stages before patchify (hybrid ViT)
    pool: str = "cls"  # cls | mean
    norm_pre: bool = True  # CLIP's ln_pre
    norm_eps: float = bounded(1e-5, low=0, low_open=True)
    layer_scale: float | None = None
    drop_path: float = bounded(0.0, low=0, high=1, high_open=True)
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)
    patch_bias: bool = False  # a bias on the patch projection (timm / BLIP ViTs; CLIP has none)

    @staticmethod
    def applicable_keys(data: dict) -> tuple[set[str], str]:
        """A ViT has no `resnet_layers`; CLIP's ResNet has no patches, blocks or ViT options."""
        kind = data.get("type", "vit")
        if kind == "resnet":
            return {"type", "image_size", "width", "heads", "resnet_layers"}, "a 'resnet' vision tower"
        return {name for name in _VISION_FIELDS if name != "resnet_layers"}, f"a '{kind}' vision tower"

    def __post_init__(self) -> None:
        if self.type not in ("vit", "resnet"):
            raise UserError(f"unknown vision tower type '{self.type}'; use 'vit' or 'resnet'")
        check_fields(self, "vision", ".")
        if self.type == "vit":
            _divisible(self, "vision")
            if self.image_size % self.patch_size:
                raise UserError(f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}")
            if self.pool not in ("cls", "mean"):
                raise UserError(f"vision.pool must be 'cls' or 'mean', not {self.pool!r}")
            _activation(self, "vision")
        elif not self.resnet_layers or any(n < 1 for n in self.resnet_layers):
            raise UserError(f"vision.resnet_layers must be four positive block counts, got {list(self.resnet_layers)}")


_VISION_FIELDS = tuple(VisionConfig.__dataclass_fields__)


@dataclass
class TextConfig:
    """A text tower: causal (CLIP/GPT-like) or bidirectional (BERT-like)."""

    vocab_size: int = bounded(49408, low=1)
    context_length: int = bounded(77, low=1)
    width: int = bounded(512, low=1)
    depth: int = bounded(12, low=0)
    heads: int = bounded(8, low=1)
    mlp_ratio: float = bounded(4.0, low=0, low_open=True)
    activation: str = "gelu"
    causal: bool = True
    pool: str = "eos"  # eos (first end token) | argmax (highest id) | cls | mean
    eos_token_id: int | None = bounded(49407, low=0)
    pad_token_id: int = bounded(0, low=0)
    prenorm: bool = True  # False = BERT's post-LN blocks
    embed_norm: bool = False  # BERT's embedding LayerNorm
    type_vocab_size: int = bounded(0, low=0)  # BERT's token-type embeddings
    norm_eps: float = bounded(1e-5, low=0, low_open=True)
    dropout: float = bounded(0.0, low=0, high=1, high_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "text", ".")
        _divisible(self, "text")
        _activation(self, "text")
        if self.pool not in ("eos", "argmax", "cls", "mean"):
            raise UserError(f"text.pool must be one of eos, argmax, cls, mean, not {self.pool!r}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and value >= self.vocab_size:
                raise UserError(f"text.{name} {value} is outside the vocabulary of {self.vocab_size} tokens")



@dataclass
class LMConfig:
    """The one decoder-only language model of the library, GPT-2 style or Llama style by its options.

    GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, biases, head tied to the token embedding.
    Llama: rotary positions, RMSNorm, SwiGLU MLP (`gated_mlp`), no biases, grouped-query attention
    (`kv_heads` < `heads`), an untied head. `lm_config_gpt2` / `lm_config_llama` give the two
    defaults; every field can be set on its own (HF configs map onto them one to one).
    """

    vocab_size: int = bounded(50257, low=1)
    context_length: int = bounded(1024, low=1)  # the most positions (GPT-2's n_positions, Llama's max_position_embeddings)
    width: int = bounded(768, low=1)
    depth: int = bounded(12, low=0)
    heads: int = bounded(12, low=1)
    kv_heads: int | None = bounded(None, low=1)  # grouped-query attention: key/value heads (None = heads)
    mlp_hidden: int | None = bounded(None, low=1)  # feed-forward width (None = 4 * width)
    activation: str = "gelu_tanh"  # GPT-2's gelu_new; Llama: silu
    gated_mlp: bool = False  # SwiGLU: down(act(gate(x)) * up(x)) (Llama)
    norm: str = "layernorm"  # layernorm | rmsnorm
    positions: str = "learned"  # learned | rotary
    rope_theta: float = bounded(10000.0, low=0, low_open=True)  # rotary base (positions="rotary")
    bias: bool = True  # biases on the attention and MLP projections (GPT-2 has them, Llama not)
    norm_eps: float = bounded(1e-5, low=0, low_open=True)
    tie_embeddings: bool = True  # the LM head is the token embedding (GPT-2); Llama has its own
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int = 0
    dropout: float = bounded(0.0, low=0, high=1, high_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "lm", ".")
        _divisible(self, "lm")
        _activation(self, "lm")
        kv_heads = self.heads if self.kv_heads is None else self.kv_heads
        if self.heads % kv_heads:
            raise UserError(f"lm.kv_heads {self.kv_heads} must divide lm.heads {self.heads}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise UserError(f"lm.norm must be 'layernorm' or 'rmsnorm', not {self.norm!r}")
        if self.positions not in ("learned", "rotary"):
            raise UserError(f"lm.positions must be 'learned' or 'rotary', not {self.positions!r}")
        if self.positions == "rotary" and (self.width // self.heads) % 2:
            raise UserError(f"rotary positions need an even head size; lm.width / lm.heads is {self.width // self.heads}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise UserError(f"lm.{name} {value} is outside the vocabulary of {self.vocab_size} tokens")

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def hidden(self) -> int:
        return 4 * self.width if self.mlp_hidden is None else self.mlp_hidden


def lm_config_gpt2(**overrides) -> dict:
    """The GPT-2 style options of `LMConfig`, as a config dict (overrides win)."""
    return {"activation": "gelu_tanh", "gated_mlp": False, "norm": "layernorm", "positions": "learned", "bias": True,
            "tie_embeddings": True, **overrides}


def lm_config_llama(**overrides) -> dict:
    """The Llama style options of `LMConfig`, as a config dict (overrides win)."""
    return {"activation": "silu", "gated_mlp": True, "norm": "rmsnorm", "positions": "rotary", "bias": False,
            "tie_embeddings": False, "norm_eps": 1e-6, **overrides}


def _divisible(config, where: str) -> None:
    if config.width % config.heads:
        raise UserError(f"{where}.width {config.width} is not divisible by {where}.heads {config.heads}")


def _activation(config, where: str) -> None:
    from vlmkit.layers.mlp import ACTIVATIONS

    if config.activation not in ACTIVATIONS:
        raise UserError(f"{where}.activation must be one of {', '.join(ACTIVATIONS)}, not {config.activation!r}")


def build_vision_tower(config: VisionConfig, output_dim: int | None) -> nn.Module:
    """The image tower a config describes, with a projection to `output_dim` (None = no projection)."""
    if config.type == "vit":
        from vlmkit.encoders.vit import VisionTransformer

        return VisionTransformer(
            image_size=config.image_size, patch_size=config.patch_size, width=config.width, depth=config.depth,
            heads=config.heads, output_dim=output_dim, mlp_ratio=config.mlp_ratio, activation=config.activation,
            conv_stem=tuple(config.conv_stem), pool=config.pool, norm_pre=config.norm_pre, norm_eps=config.norm_eps,
            layer_scale=config.layer_scale, drop_path=config.drop_path, patch_bias=config.patch_bias,
        )
    if config.type == "resnet":
        from vlmkit.encoders.resnet import ModifiedResNet

        return ModifiedResNet(
            layers=tuple(config.resnet_layers), output_dim=output_dim, heads=config.heads,
            image_size=config.image_size, width=config.width,
        )
    raise AssertionError(config.type)  # VisionConfig rejects other types


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
