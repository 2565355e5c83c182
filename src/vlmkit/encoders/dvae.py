"""The discrete VAE of DALL-E (Ramesh et al. 2021; openai/DALL-E dall_e/encoder.py, decoder.py).

    pixels in [0, 1] (B, 3, H, W) -> map_pixels -> encoder -> logits (B, K, H/f, W/f)
    logits -> Gumbel-softmax relaxation (training) or argmax one-hot (inference) -> (B, K, h, w)
    one-hot -> decoder -> (B, 3, H, W) in [0, 1] (sigmoid, then unmap_pixels)

Encoder: a 7x7 input conv, then `groups` groups of residual blocks whose widths double
(1, 2, 4, ... x `hidden`), a 2x2 max-pool after every group but the last (downsampling factor
f = 2 ** (groups - 1)), then ReLU and a 1x1 conv to K logits per grid cell. Decoder: a 1x1 conv
from the K-way one-hot (so its weight is the codebook), groups of residual blocks of halving
width with a nearest 2x upsample after every group but the last, then ReLU and a 1x1 conv to
the output pixels. Residual blocks are OpenAI's: `id_path(x) + post_gain * res_path(x)` with
`post_gain = 1 / n_layers ** 2`, a bottleneck of a quarter of the output width, and a 1x1
`id_path` when the width changes.

One deliberate difference from OpenAI's decoder: it outputs 3 channels read through a sigmoid
and trained with MSE (DALLE-pytorch's choice), not the 6 channels of the logit-Laplace
likelihood; `map_pixels` / `unmap_pixels` (epsilon 0.1) are kept so the output range is OpenAI's.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import bounded, check_fields

LOGIT_LAPLACE_EPS = 0.1  # openai/DALL-E dall_e/utils.py


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps] (OpenAI's `map_pixels`), what the encoder reads."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


@dataclass
class DiscreteVAEConfig:
    """The architecture of a discrete VAE (the `vision` section of the dvae and dalle families)."""

    image_size: int = bounded(256, low=8)
    num_tokens: int = bounded(8192, low=2)  # K, the codebook size (OpenAI's vocab_size)
    hidden: int = bounded(256, low=4)  # n_hid: the width of the first encoder group
    groups: int = bounded(4, low=1)  # group_count; downsampling factor 2 ** (groups - 1)
    blocks_per_group: int = bounded(2, low=1)  # n_blk_per_group
    decoder_init: int = bounded(128, low=4)  # n_init: the decoder's first width
    # The mean and std the trainer's image transform normalised the pixels with (CLIP's): the
    # model undoes them, since the VAE works on [0, 1] pixels.
    pixel_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    pixel_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        check_fields(self, "vision", separator=".")
        factor = 2 ** (self.groups - 1)
        if self.image_size % factor:
            raise ValueError(f"vision.image_size {self.image_size} is not divisible by the downsampling factor {factor} "
                             f"of {self.groups} groups; change one of them")

    @property
    def grid_size(self) -> int:
        """Side of the token grid: image_size / 2 ** (groups - 1)."""
        return self.image_size // 2 ** (self.groups - 1)

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size ** 2


class ResidualBlock(nn.Module):
    """OpenAI's EncoderBlock / DecoderBlock: id_path(x) + post_gain * res_path(x)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, decoder: bool) -> None:
        super().__init__()
        n_hid = max(n_out // 4, 1)
        self.post_gain = 1 / n_layers ** 2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        # The encoder's path ends in a 1x1 conv, the decoder's starts with one (as in OpenAI's code).
        kernels = (1, 3, 3, 3) if decoder else (3, 3, 3, 1)
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers = []
        for index, kernel in enumerate(kernels):
            layers += [(f"relu_{index + 1}", nn.ReLU()),
                       (f"conv_{index + 1}", nn.Conv2d(widths[index], widths[index + 1], kernel, padding=kernel // 2))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """[0, 1] pixels (B, 3, H, W) -> logits over the codebook (B, K, h, w)."""

    def __init__(self, config: DiscreteVAEConfig) -> None:
        super().__init__()
        n_layers = config.groups * config.blocks_per_group
        widths = [config.hidden * 2 ** index for index in range(config.groups)]
        modules: list[tuple[str, nn.Module]] = [("input", nn.Conv2d(3, widths[0], 7, padding=3))]
        n_in = widths[0]
        for group, width in enumerate(widths):
            blocks = [(f"block_{b + 1}", ResidualBlock(n_in if b == 0 else width, width, n_layers, decoder=False))
                      for b in range(config.blocks_per_group)]
            if group < config.groups - 1:
                blocks.append(("pool", nn.MaxPool2d(2)))
            modules.append((f"group_{group + 1}", nn.Sequential(OrderedDict(blocks))))
            n_in = width
        modules.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(n_in, config.num_tokens, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(modules))

    def forward(self, pixels01: torch.Tensor) -> torch.Tensor:
        return self.blocks(map_pixels(pixels01))  # (B, K, h, w)


class DVAEDecoder(nn.Module):
    """A (relaxed) one-hot grid over the codebook (B, K, h, w) -> [0, 1] pixels (B, 3, H, W)."""

    def __init__(self, config: DiscreteVAEConfig) -> None:
        super().__init__()
        n_layers = config.groups * config.blocks_per_group
        widths = [config.hidden * 2 ** index for index in reversed(range(config.groups))]
        # The input conv reads the one-hot: column k of its weight is codebook entry k.
        modules: list[tuple[str, nn.Module]] = [("input", nn.Conv2d(config.num_tokens, config.decoder_init, 1))]
        n_in = config.decoder_init
        for group, width in enumerate(widths):
            blocks = [(f"block_{b + 1}", ResidualBlock(n_in if b == 0 else width, width, n_layers, decoder=True))
                      for b in range(config.blocks_per_group)]
            if group < config.groups - 1:
                blocks.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            modules.append((f"group_{group + 1}", nn.Sequential(OrderedDict(blocks))))
            n_in = width
        modules.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(n_in, 3, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(modules))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return unmap_pixels(torch.sigmoid(self.blocks(codes)))  # (B, 3, H, W)


class DiscreteVAE(nn.Module):
    """Encoder + decoder; `encode` gives token ids, `decode` pixels from ids (the image tower of DALL-E)."""

    def __init__(self, config: DiscreteVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DVAEEncoder(config)
        self.decoder = DVAEDecoder(config)

    def to_unit_range(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (what the image transform gives) -> [0, 1]."""
        # Built from the config per call, not kept as buffers: a model loaded on the meta device keeps no stale copy.
        mean = torch.tensor(self.config.pixel_mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.pixel_std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels * std + mean).clamp(0, 1)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> codebook logits (B, K, h, w)."""
        return self.encoder(self.to_unit_range(pixels))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> token ids (B, h * w), raster order (argmax, as OpenAI's inference)."""
        return self.logits(pixels).argmax(dim=1).flatten(1)  # (B, h*w)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h * w) -> [0, 1] pixels (B, 3, H, W)."""
        side = self.config.grid_size
        one_hot = F.one_hot(tokens.view(-1, side, side), self.config.num_tokens)  # (B, h, w, K)
        weight = self.decoder.blocks.input.weight
        return self.decoder(one_hot.permute(0, 3, 1, 2).to(weight.dtype))  # (B, 3, H, W)


# ---- the training objective's pieces -------------------------------------------------------
def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q || uniform) in nats for each grid cell, q = softmax(logits) over `dim`:
    sum_k q_k log q_k + log K. Shape: `logits` without `dim`."""
    log_q = logits.log_softmax(dim=dim)
    return (log_q.exp() * log_q).sum(dim=dim) + math.log(logits.shape[dim])


def cosine_anneal(step: int | torch.Tensor, start: float, end: float, steps: int) -> torch.Tensor | float:
    """start -> end along half a cosine over `steps` updates, then `end` (DALL-E's temperature schedule)."""
    progress = min(float(step) / steps, 1.0) if steps > 0 else 1.0
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int | torch.Tensor, target: float, steps: int) -> float:
    """0 -> target linearly over `steps` updates, then `target` (DALL-E's KL-weight schedule)."""
    return target * min(float(step) / steps, 1.0) if steps > 0 else target
