"""Pieces the two-stream fusion encoders (ViLBERT, LXMERT) share, below the family files; the tasks,
fine-tuning heads and datasets of every fusion encoder are `encoders.fusion`'s.

- `RegionEmbedding`: region features (B, N, F) and their boxes (B, N, P) -> visual tokens (B, N, D),
  LXMERT's `(LN(fc(feat)) + LN(fc(box))) / 2` (`combine="mean"`) or ViLBERT's
  `LN(fc(feat) + fc(box))` (`combine="sum"`).
- `Pooler`: tanh(dense(first token)), BERT's pooled output.
- `RegionHead`: dense -> activation -> LayerNorm, then one linear decoder per masked-region target
  (the region's feature for regression, its classes for classification); HF's `LxmertVisualObjHead`.
- `mask_regions`: which regions a pre-training step masks, drawn from an explicit generator.
- `feature_regression_loss`: LXMERT's masked-feature loss, SmoothL1 over the masked regions.
- `idle_heads_term`: keeps the fine-tuning heads in a pre-training step's graph (zero gradients).
- `TwoStreamTasks`: the capability methods both families answer with (`answer`, `verify`, `match`,
  `image_match_features`, `match_scores`, `region_inputs`), written once over the family's
  `visual_features` and `encode`.

The streams themselves are `layers.transformer.Transformer` stacks and `CoAttentionBlock`s; each
family composes them in its own order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.encoders.regions import region_inputs
from vlmkit.errors import UserError
from vlmkit.layers.mlp import make_activation

class RegionEmbedding(nn.Module):
    """Region features and box geometry -> visual tokens. (B, N, F), (B, N, P) -> (B, N, D)"""

    def __init__(self, feat_dim: int, pos_dim: int, width: int, norm_eps: float = 1e-12, combine: str = "mean") -> None:
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"unknown region combine '{combine}'; use 'mean' (LXMERT) or 'sum' (ViLBERT)")
        self.combine = combine
        self.feat_fc = nn.Linear(feat_dim, width)
        self.box_fc = nn.Linear(pos_dim, width)
        if combine == "mean":  # each part normalised on its own, then averaged
            self.feat_norm = nn.LayerNorm(width, eps=norm_eps)
            self.box_norm = nn.LayerNorm(width, eps=norm_eps)
        else:
            self.norm = nn.LayerNorm(width, eps=norm_eps)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if self.combine == "mean":
            return (self.feat_norm(self.feat_fc(feats)) + self.box_norm(self.box_fc(boxes))) / 2  # (B, N, D)
        return self.norm(self.feat_fc(feats) + self.box_fc(boxes))  # (B, N, D)


class Pooler(nn.Module):
    """BERT's pooled output: tanh(dense(hidden[:, 0])). (B, T, D) -> (B, D)"""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class RegionHead(nn.Module):
    """Masked region modelling: a shared transform, then `decoders[name]` (Linear to `sizes[name]`)."""

    def __init__(self, width: int, sizes: dict[str, int], activation: str = "gelu", norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.activation = make_activation(activation)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.decoders = nn.ModuleDict({name: nn.Linear(width, size) for name, size in sizes.items()})

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.norm(self.activation(self.dense(hidden)))  # (..., D): (B, N, D) or the masked (M, D)
        return {name: decoder(shared) for name, decoder in self.decoders.items()}  # name -> (..., size)


def mask_regions(real: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """(B, N) bool: which real regions are masked (LXMERT zeroes their features), at least one per batch."""
    chosen = (torch.rand(real.shape, generator=generator).to(real.device) < probability) & real
    if not chosen.any() and real.any():
        first = real.flatten().nonzero()[0]
        chosen = chosen.flatten().index_fill(0, first, True).view_as(chosen)
    return chosen


def feature_regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LXMERT's masked-feature loss: SmoothL1 between the predicted and original features (M, F) of the
    M masked regions, averaged over their features."""
    if predicted.shape[0] == 0:
        return predicted.sum() * 0.0  # keeps every head in the graph
    return F.smooth_l1_loss(predicted, target)


def idle_heads_term(heads: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """0 times the answer and reasoning heads' outputs: pre-training does not train the fine-tuning heads,
    but every parameter still gets a (zero) gradient, so DDP needs no unused-parameter search and an
    optimizer state exists for every tensor from the first step."""
    term = pooled.new_zeros(())
    for head in (getattr(heads, "answer", None), getattr(heads, "reasoning", None)):
        if head is not None:
            term = term + 0.0 * head(pooled).sum()
    return term


class TwoStreamTasks:
    """The `Answers`, `Verifies`, `MatchesImageText` and `ReadsRegions` methods of a two-stream family.

    A family class mixes this in and provides: `visual_features(batch) -> {"feats" (B, N, F), "pos" (B, N, P),
    "mask" (B, N)}` from `pixels` (and optional boxes), `encode(tokens, feats, pos, visual_mask=...)` whose third
    output is the fused pooled feature (B, D), `heads` (`encoders.fusion.FusionHeads`), and
    `visual_widths() -> (F, P)`, the widths `image_match_features` packs. The config holds `visual`,
    `vision.image_size`, `region_classes` and `answers`.
    """

    def visual_widths(self) -> tuple[int, int]:
        raise NotImplementedError

    def region_inputs(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The records' object boxes where the evaluation transform puts them (`ReadsRegions`)."""
        config = self.config
        return region_inputs(records, self.transform, config.visual, config.vision.image_size, config.region_classes)

    def _pooled(self, pixels: torch.Tensor, tokens: torch.Tensor, regions: dict | None) -> torch.Tensor:
        """(B, D) the fused pooled feature of each (image, text) row; `regions` from `region_inputs`."""
        batch = {key: value.to(self.device) for key, value in (regions or {}).items()}
        visual = self.visual_features({**batch, "pixels": pixels.to(self.device)})
        return self.encode(tokens.to(self.device), visual["feats"], visual["pos"], visual_mask=visual["mask"])[2]

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, questions: list[str], regions: dict | None = None, **_) -> list[str]:
        """The answer head's highest-scoring answer for each (image, question); `regions` from `region_inputs`."""
        if self.heads.answer is None:
            raise UserError(f"this {self.family} model has no answer head; fine-tune it with task=vqa on records "
                            "with 'qa'")
        logits = self.heads.answer(self._pooled(pixels, self.tokenize(questions), regions))
        return [self.config.answers[i] for i in logits.argmax(-1).tolist()]

    @torch.no_grad()
    def verify(self, pixels: torch.Tensor, statements: list[str], regions: dict | None = None) -> torch.Tensor:
        """(B,) probability that each statement is true of its image."""
        return torch.sigmoid(self.heads.reasoning(self._pooled(pixels, self.tokenize(statements), regions))[:, 0]).cpu()

    @torch.no_grad()
    def match(self, pixels: torch.Tensor, tokens: torch.Tensor, regions: dict | None = None) -> torch.Tensor:
        """(B,) probability that text row b describes image row b (softmax of the ITM / alignment head)."""
        return self.heads.itm(self._pooled(pixels, tokens, regions)).softmax(-1)[:, 1].cpu()

    def image_match_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, F + P + 1): each image's region features, locations and mask, packed for `match_scores`."""
        visual = self.visual_features({"pixels": pixels.to(self.device)})
        return torch.cat([visual["feats"], visual["pos"], visual["mask"][..., None].to(visual["feats"].dtype)], dim=-1)

    def match_scores(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the ITM "match" logit minus the "no match" one, of text row b against image-feature row b."""
        feats, pos, mask = image_features.split([*self.visual_widths(), 1], dim=-1)
        logits = self.heads.itm(self.encode(tokens.to(self.device), feats, pos, visual_mask=mask[..., 0] > 0.5)[2])
        return logits[:, 1] - logits[:, 0]  # (B,)
