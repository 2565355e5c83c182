"""MMCA (Wei et al. CVPR 2020): multi-modality cross attention for image-sentence matching.

    image -> vision tower grid (+ its pooled embedding) -> Linear -> regions (B, R, D)
    text  -> text tower tokens -> Linear -> words (B, L, D)
    self-attention module per modality:  i0 = mean(SA_img(regions)),  c0 = mean over real words(SA_txt(words))
    cross-attention module, per (image, text) pair, one transformer over [regions ; words] (plus a
    modality embedding):  i1 = mean of its region outputs,  c1 = mean of its real word outputs
    S(I, T) = cos(i0, c0) + alpha * cos(i1, c1)

Trained with the bidirectional hinge triplet loss on the hardest negatives of the batch (VSE++,
`losses.hinge_triplet_loss_from_scores`; `training.hardest_after: N` sums every negative for the first N
updates, VSE++'s warm-up for towers trained from scratch) over the full (B, B) matrix of S, so every step runs the
cross module on all B^2 pairs (keep batches and widths small on a CPU). The paper's regions are
bottom-up detector features; here they are the image tower's last grid cells and its pooled
embedding (a ResNet's 2 x 2 grid at 64 px, or a ViT's patches), which is what the built-in data
allows without boxes at evaluation time.

Capabilities: `encode_image` / `encode_text` are i0 / c0 (the intra-modality term, a dual encoder);
`MatchesImageText` gives the cross term, `match_scores = alpha * cos(i1, c1)`, so
`vlmkit eval retrieval --rerank-k K` scores each query's top K by cos(i0, c0) with exactly S.
MMCA has no matching classifier: `match` maps S from [-(1 + alpha), 1 + alpha] linearly onto [0, 1],
a similarity, not a calibrated probability.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import EmbedsImages, EmbedsTexts, MatchesImageText
from vlmkit.config import bounded, check_fields
from vlmkit.encoders.config import TextConfig, VisionConfig, build_text_tower, build_vision_tower
from vlmkit.errors import UserError
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.transformer import Transformer
from vlmkit.layers.update_counter import UpdateCounter
from vlmkit.losses import hinge_triplet_loss_from_scores, matching_accuracy
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


@dataclass
class MMCAConfig:
    embed_dim: int = bounded(1024, low=1)  # width of the attention modules and of i0, c0, i1, c1
    heads: int = bounded(8, low=1)
    self_depth: int = bounded(1, low=1)  # layers of each self-attention module
    cross_depth: int = bounded(1, low=1)  # layers of the cross-attention module
    alpha: float = bounded(1.0, low=0)  # weight of the cross term in S (the paper's value is not public)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(type="resnet", width=64, heads=32))
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        check_fields(self, "model", ".")
        if self.embed_dim % self.heads:
            raise UserError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}; pick heads that divide it")


@dataclass
class MMCATraining:
    """The recipe's `training:` options of MMCA."""

    margin: float = bounded(0.2, low=0)  # VSE++'s margin
    hardest: bool = True  # the hardest negative only (false: every negative, VSE0)
    # optimizer updates on every negative (VSE0) before the hardest only: VSE++'s warm-up for towers that
    # start from random weights, where the hardest negative alone collapses (0 = hardest from the start)
    hardest_after: int = bounded(0, low=0)

    def __post_init__(self) -> None:
        check_fields(self, "training", ".")


def _masked_mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean of (..., T, D) over the T positions where `real` (..., T) is True."""
    weights = real.to(x.dtype)[..., None]
    return (x * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


@register_family
class MMCA(VLModel):
    family = "mmca"
    config_class = MMCAConfig
    training_class = MMCATraining
    capabilities = (EmbedsImages, EmbedsTexts, MatchesImageText)
    towers = {"image": "visual", "text": "text"}
    uses_every_parameter = True

    def __init__(self, config: MMCAConfig) -> None:
        super().__init__(config)
        width, heads = config.embed_dim, config.heads
        self.visual = build_vision_tower(config.vision, width)  # its pooled output is region 0, already at width
        self.text = build_text_tower(config.text, None)
        grid_width = config.vision.width * 32 if config.vision.type == "resnet" else config.vision.width
        self.region_proj = nn.Linear(grid_width, width)
        self.word_proj = nn.Linear(config.text.width, width)
        self.image_self = Transformer(width, config.self_depth, heads)
        self.text_self = Transformer(width, config.self_depth, heads)
        self.image_norm, self.text_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = Transformer(width, config.cross_depth, heads)
        self.cross_norm = nn.LayerNorm(width)
        self.modality = nn.Parameter(torch.randn(2, width) * 0.02)  # tells regions from words in the joint sequence
        self.updates = UpdateCounter()  # saved with the weights: a resumed run keeps its place in `hardest_after`

    # ---- fragments -----------------------------------------------------------------------------
    def regions(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + g*g, D): the tower's pooled embedding, then its grid cells, projected."""
        output = self.visual(pixels)  # one tower pass gives both the pooled embedding and the grid
        tokens = output.tokens  # (B, g*g, C) a ResNet's grid, or (B, 1 + N, W) a ViT's tokens
        if hasattr(self.visual, "class_embedding"):  # a ViT: its patches, normalised as its pooled output is
            tokens = self.visual.norm_post(tokens[:, 1:])
        return torch.cat([output.pooled[:, None], self.region_proj(tokens)], dim=1)  # (B, R, D)

    def words(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) -> words (B, L', D) and their real-token mask (B, L'), trailing padding trimmed."""
        tokens = self.text.trim_padding(tokens)
        return self.word_proj(self.text(tokens).tokens), self.text.real_tokens(tokens)

    def intra(self, regions: torch.Tensor, words: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-attention modules: i0 (B, D), c0 (B, D)."""
        image = self.image_norm(self.image_self(regions)).mean(dim=1)
        text = _masked_mean(self.text_norm(self.text_self(words, mask=padding_mask(real))), real)
        return image, text

    def inter(self, regions: torch.Tensor, words: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention module over row-aligned pairs: regions (P, R, D) with words (P, L, D) -> i1, c1 (P, D)."""
        count = regions.shape[1]
        joint = torch.cat([regions + self.modality[0], words + self.modality[1]], dim=1)  # (P, R+L, D)
        keys = torch.cat([torch.ones(real.shape[0], count, dtype=torch.bool, device=real.device), real], dim=1)
        out = self.cross_norm(self.cross(joint, mask=padding_mask(keys)))  # (P, R+L, D)
        return out[:, :count].mean(dim=1), _masked_mean(out[:, count:], real)

    def similarity(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """S (B_img, B_txt): cos(i0, c0) + alpha cos(i1, c1) for every image against every text."""
        regions = self.regions(pixels)  # (Bi, R, D)
        words, real = self.words(tokens)  # (Bt, L, D), (Bt, L)
        image, text = self.intra(regions, words, real)  # (Bi, D), (Bt, D)
        return self._similarity(regions, words, real, image, text)

    def _similarity(self, regions, words, real, image, text) -> torch.Tensor:
        images, texts = regions.shape[0], words.shape[0]
        pair_regions = regions[:, None].expand(-1, texts, -1, -1).flatten(0, 1)  # (Bi*Bt, R, D): image i, text j
        pair_words = words[None].expand(images, -1, -1, -1).flatten(0, 1)  # (Bi*Bt, L, D)
        pair_real = real[None].expand(images, -1, -1).flatten(0, 1)  # (Bi*Bt, L)
        image_cross, text_cross = self.inter(pair_regions, pair_words, pair_real)  # (Bi*Bt, D) x 2
        cross = F.cosine_similarity(image_cross, text_cross, dim=-1).view(images, texts)  # (Bi, Bt)
        return F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T + self.config.alpha * cross

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        regions = self.regions(batch["pixels"])  # (B, R, D)
        words, real = self.words(batch["tokens"])  # (B, L, D), (B, L)
        image, text = self.intra(regions, words, real)  # (B, D) x 2
        scores = self._similarity(regions, words, real, image, text)  # (B, B)
        options = self.training_options
        hardest = options.hardest and self.updates.reached(options.hardest_after)
        loss = hinge_triplet_loss_from_scores(scores, margin=options.margin, hardest=hardest)
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, i2t_acc=matching_accuracy(scores),
                                                         hardest=scores.new_tensor(float(hardest))))

    def after_optimizer_step(self) -> None:
        self.updates.step()

    # ---- capabilities ----------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """i0 (B, D), not normalised."""
        return self.image_norm(self.image_self(self.regions(pixels))).mean(dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """c0 (B, D), not normalised."""
        words, real = self.words(tokens)
        return _masked_mean(self.text_norm(self.text_self(words, mask=padding_mask(real))), real)

    def image_match_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, R, D): the image's regions, which the cross module reads."""
        return self.regions(pixels)

    def match_scores(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the cross term alpha * cos(i1, c1) of row-aligned pairs (S minus cos(i0, c0))."""
        words, real = self.words(tokens.to(image_features.device))
        image_cross, text_cross = self.inter(image_features, words, real)
        return self.config.alpha * F.cosine_similarity(image_cross, text_cross, dim=-1)

    @torch.no_grad()
    def match(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) S of row-aligned pairs mapped linearly onto [0, 1] (a similarity, not a probability)."""
        regions = self.regions(pixels.to(self.device))
        words, real = self.words(tokens.to(self.device))
        image, text = self.intra(regions, words, real)
        image_cross, text_cross = self.inter(regions, words, real)
        scores = F.cosine_similarity(image, text, dim=-1) + self.config.alpha * F.cosine_similarity(image_cross, text_cross, dim=-1)
        return ((scores / (1 + self.config.alpha) + 1) / 2).cpu()

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        from vlmkit.encoders.lm import random_texts

        generator = torch.Generator().manual_seed(seed)
        size = self.config.vision.image_size
        return {"pixels": torch.randn(batch_size, 3, size, size, generator=generator),
                "tokens": random_texts(self.config.text, batch_size, generator)}


register_config("mmca-tiny", "mmca", tiny=True, config={
    # clip-rn-tiny's towers (CLIP's ResNet at 64 px: its 2 x 2 grid + pooled embedding are 5 regions;
    # a 3-block causal text tower), attention modules of width 64 (the cross module runs on B^2 pairs).
    "embed_dim": 64, "heads": 4, "self_depth": 1, "cross_depth": 1, "alpha": 1.0,
    "vision": {"type": "resnet", "image_size": 64, "width": 32, "heads": 4, "resnet_layers": [1, 1, 1, 1]},
    "text": {"width": 128, "depth": 3, "heads": 4, "context_length": 32, "vocab_size": 1024, "eos_token_id": 1023},
})
