"""Visual inputs of the fusion encoders: region features, grid features, and how a batch carries them.

Fusion encoders (VisualBERT, UNITER, ViLBERT, LXMERT, MMCA) read a set of visual tokens, each a
feature vector with a box. They come from an image tower's grid, two ways:

- Region features (the papers' bottom-up regions): for each box of a record's `objects`
  (`[{name, box}]`, boxes `[x0, y0, x1, y1]` in image pixels, checked by `data.objects`) the
  backbone grid is RoIAlign-pooled (`layers.roi.roi_align`, written with `grid_sample`) to
  `roi_size` x `roi_size` bins and averaged into one vector: `pool_regions`. With
  `image_region` the whole image is region 0 (ViLBERT's global image token), so a record with
  few objects still shows its context.
- Grid features (Pixel-BERT): every grid cell is a visual token whose box is the cell:
  `grid_regions`; in training `sample_cells` keeps a random `grid_keep` fraction of them per image.

Every token also has a box-geometry vector, `box_geometry`: (x0, y0, x1, y1, w, h, area), each
normalised by the image side (area by its square) — UNITER's 7-d location feature.

Batch contract (what a family's dataset puts in a batch and `VisualInputs` reads):
- `pixels` (B, 3, S, S) as every image family;
- `boxes` (B, R, 4) float, in pixels of the transformed S x S image (the training crop and flip
  applied to the record's boxes by `record_regions`), zero rows as padding;
- `region_mask` (B, R) bool, True for a real box; `region_labels` (B, R) long, the index of the
  box's object name in the family's `region_classes` (-1 for padding or an unknown name).
A record without objects has R = 0 real boxes: with `source: auto` its image falls back to grid
features (per sample, in the same batch as records with boxes); with `source: regions` it is an
error naming the fix; `source: grid` ignores boxes. In a dataset, `sample_regions` (the image,
its transform and the sample's augmentation generator) builds one sample's part, `collate_regions`
pads them; `region_classes` lists the object names of the training records. At evaluation,
`region_inputs` gives a family's `ReadsRegions` boxes through the evaluation transform.

Model side: `VisualInputs(config, width).forward(grid, batch, generator)` -> `VisualTokens`
(features (B, T, C), boxes (B, T, 4), geometry (B, T, 7), mask (B, T), label distribution
(B, T, 1 + K) when the batch has labels, 0 = background); `backbone_grid(tower, pixels)` turns a
ViT or ResNet tower's output into the (B, C, g, g) grid. `VisualEmbedding` is the usual
embedding of a token: LayerNorm(W_f feature) + LayerNorm(W_g geometry) (UNITER); families that need
another combination (HF VisualBERT's projection without geometry) build their own from `VisualTokens`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import bounded
from vlmkit.errors import UserError
from vlmkit.layers.roi import roi_align

GEOMETRY_DIM = 7  # x0, y0, x1, y1, w, h, area
SOURCES = ("auto", "regions", "grid")


@dataclass
class VisualInputConfig:
    """Where a fusion encoder's visual tokens come from (the `visual` section of its config)."""

    source: str = "auto"  # auto (regions where a record has objects, grid cells otherwise) | regions | grid
    max_regions: int = bounded(16, low=1)  # object boxes kept per image (the first ones of `objects`)
    roi_size: int = bounded(2, low=1)  # RoIAlign bins per side, averaged into one vector
    sampling_ratio: int = bounded(2, low=1)  # bilinear samples per bin side
    image_region: bool = True  # the whole image as region 0 (ViLBERT's global image feature)
    grid_keep: float = bounded(1.0, low=0, high=1, low_open=True)  # Pixel-BERT: cells kept per image in training

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"visual.source must be one of {', '.join(SOURCES)}, not {self.source!r}")


@dataclass
class VisualTokens:
    """A batch's visual tokens. `labels`: (B, T, 1 + K) label distribution (index 0 = background) or None."""

    features: torch.Tensor  # (B, T, C) pooled backbone features
    boxes: torch.Tensor  # (B, T, 4) in pixels of the S x S input
    geometry: torch.Tensor  # (B, T, 7)
    mask: torch.Tensor  # (B, T) bool, True = a real token
    labels: torch.Tensor | None = None


# ---- geometry and pooling ------------------------------------------------------------------

def box_geometry(boxes: torch.Tensor, image_size: float) -> torch.Tensor:
    """(..., 4) boxes [x0, y0, x1, y1] in pixels of a square `image_size` image -> (..., 7)
    (x0, y0, x1, y1, w, h, area) normalised by the side (area by the side squared)."""
    unit = boxes / image_size
    width, height = unit[..., 2] - unit[..., 0], unit[..., 3] - unit[..., 1]
    return torch.cat([unit, width[..., None], height[..., None], (width * height)[..., None]], dim=-1)


def backbone_grid(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, C, g, g): the image tower's last feature grid (a ViT's patch tokens after its
    final LayerNorm, without [CLS]; a ResNet's last stage)."""
    tokens = tower(pixels).tokens  # (B, [1 +] g*g, C)
    if hasattr(tower, "class_embedding"):  # a ViT: drop [CLS], normalise as its pooled output is
        tokens = tower.norm_post(tokens[:, 1:])
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise UserError(f"the image tower gives {tokens.shape[1]} tokens, not a square grid; use a square image size")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def pool_regions(grid: torch.Tensor, boxes: torch.Tensor, image_size: int, roi_size: int = 2,
                 sampling_ratio: int = 2) -> torch.Tensor:
    """(B, C, g, g) grid, (B, R, 4) boxes in pixels of the `image_size` input -> (B, R, C): each box
    RoIAligned to roi_size x roi_size bins of the grid and averaged (padding boxes give garbage the
    mask hides)."""
    batch, regions = boxes.shape[:2]
    if regions == 0:
        return grid.new_zeros(batch, 0, grid.shape[1])
    index = torch.arange(batch, device=grid.device).repeat_interleave(regions)  # (B*R,)
    pooled = roi_align(grid, boxes.reshape(-1, 4), index, roi_size, spatial_scale=grid.shape[-1] / image_size,
                       sampling_ratio=sampling_ratio)  # (B*R, C, r, r)
    return pooled.mean(dim=(2, 3)).view(batch, regions, -1)  # (B, R, C)


def grid_regions(grid: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, g, g) -> every cell as a token: features (B, g*g, C) row-major, boxes (B, g*g, 4) (the cells)."""
    batch, _, side, _ = grid.shape
    step = image_size / side
    edges = torch.arange(side, device=grid.device, dtype=grid.dtype) * step
    y0, x0 = torch.meshgrid(edges, edges, indexing="ij")  # (g, g)
    cells = torch.stack([x0, y0, x0 + step, y0 + step], dim=-1).reshape(1, -1, 4).expand(batch, -1, -1)
    return grid.flatten(2).transpose(1, 2), cells


def sample_cells(batch: int, cells: int, keep: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, K) indices of K = ceil(keep * cells) grid cells per image drawn without replacement, in
    row-major order (Pixel-BERT's random pixel sampling, at the grid's resolution)."""
    count = max(1, math.ceil(keep * cells))
    scores = torch.rand(batch, cells, generator=generator).to(device)
    return scores.argsort(dim=1)[:, :count].sort(dim=1).values


def label_distribution(boxes: torch.Tensor, mask: torch.Tensor, object_boxes: torch.Tensor,
                       object_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, T, 4) token boxes, (B, T) mask, (B, R, 4) object boxes with (B, R) labels (-1 = none) ->
    (B, T, 1 + num_classes): the share of each token's box covered by each class, the rest background
    (index 0); overlaps count each object (renormalised so a row sums to 1). An object's own box is
    all its class (up to what other objects cover inside it)."""
    top_left = torch.maximum(boxes[:, :, None, :2], object_boxes[:, None, :, :2])
    bottom_right = torch.minimum(boxes[:, :, None, 2:], object_boxes[:, None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # (B, T, R)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-9)  # (B, T)
    cover = inter / area[..., None] * (object_labels >= 0)[:, None, :]  # (B, T, R)
    one_hot = F.one_hot(object_labels.clamp(min=0), num_classes).to(cover.dtype)  # (B, R, K)
    classes = cover @ one_hot  # (B, T, K)
    total = classes.sum(-1, keepdim=True)
    classes = torch.where(total > 1, classes / total.clamp(min=1e-9), classes)
    background = (1 - classes.sum(-1, keepdim=True)).clamp(min=0)
    return torch.cat([background, classes], dim=-1) * mask[..., None]


# ---- the model side ------------------------------------------------------------------------

class VisualInputs(nn.Module):
    """The one entry point of a family: grid + batch -> VisualTokens (regions, grid cells, or both per sample).

    No parameters: the family embeds `VisualTokens` itself (`VisualEmbedding` or its own layout).
    """

    def __init__(self, config: VisualInputConfig, image_size: int, num_classes: int = 0) -> None:
        super().__init__()
        self.config, self.image_size, self.num_classes = config, image_size, num_classes

    def forward(self, grid: torch.Tensor, batch: dict, generator: torch.Generator | None = None) -> VisualTokens:
        config, side = self.config, self.image_size
        size = grid.shape[0]
        boxes = batch.get("boxes")
        if boxes is None or config.source == "grid":
            boxes = grid.new_zeros(size, 0, 4)
            region_mask = torch.zeros(size, 0, dtype=torch.bool, device=grid.device)
        else:
            boxes, region_mask = boxes.to(grid.dtype), batch["region_mask"]
        has_regions = region_mask.any(dim=1)  # (B,)
        if config.source == "regions" and not bool(has_regions.all()):
            raise UserError(f"{int((~has_regions).sum())} image(s) of the batch have no object boxes, but visual.source "
                            "is 'regions'; give records with 'objects' or set visual.source=auto (grid features then)")
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (features, boxes, mask)
        if config.image_region:
            whole = grid.new_tensor([0.0, 0.0, side, side]).expand(size, 1, 4)
            parts.append((grid.mean(dim=(2, 3))[:, None], whole, torch.ones(size, 1, dtype=torch.bool, device=grid.device)))
        if bool(has_regions.any()):
            parts.append((pool_regions(grid, boxes, side, config.roi_size, config.sampling_ratio), boxes, region_mask))
        if not bool(has_regions.all()):  # grid cells for the images without boxes
            features, cells = grid_regions(grid, side)  # (B, N, C), (B, N, 4)
            if self.training and config.grid_keep < 1:
                keep = sample_cells(size, cells.shape[1], config.grid_keep, grid.device, generator)  # (B, K)
                features = features.gather(1, keep[..., None].expand(-1, -1, features.shape[-1]))
                cells = cells.gather(1, keep[..., None].expand(-1, -1, 4))
            parts.append((features, cells, (~has_regions)[:, None].expand(-1, cells.shape[1])))
        features = torch.cat([p[0] for p in parts], dim=1)  # (B, T, C)
        token_boxes = torch.cat([p[1] for p in parts], dim=1)  # (B, T, 4)
        mask = torch.cat([p[2] for p in parts], dim=1)  # (B, T)
        labels = None
        if self.num_classes and "region_labels" in batch and batch.get("boxes") is not None:
            object_labels = batch["region_labels"].masked_fill(~batch["region_mask"], -1)
            labels = label_distribution(token_boxes, mask, batch["boxes"].to(grid.dtype), object_labels, self.num_classes)
        return VisualTokens(features, token_boxes, box_geometry(token_boxes, side), mask, labels)


class VisualEmbedding(nn.Module):
    """(B, T, C) features + (B, T, 7) geometry -> (B, T, D) = LN(W_f f) + LN(W_g g) (UNITER's image embedder)."""

    def __init__(self, feature_dim: int, width: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.feature = nn.Linear(feature_dim, width)
        self.feature_norm = nn.LayerNorm(width, eps=eps)
        self.geometry = nn.Linear(GEOMETRY_DIM, width)
        self.geometry_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, features: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        return self.feature_norm(self.feature(features)) + self.geometry_norm(self.geometry(geometry))


# ---- the dataset side ----------------------------------------------------------------------

def record_regions(record: dict, image_width: int, image_height: int, image_size: int,
                   point_map: Callable[[float, float], tuple[float, float]], classes: Sequence[str],
                   max_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A record's object boxes where they land in the transformed `image_size` image (the crop and flip
    that `point_map` (ImageTransform.point_map) describes), clipped to it; boxes cut to under a pixel
    are dropped. -> boxes (R, 4) float, labels (R,) long (index into `classes`, -1 if not one of them).
    A record without `objects` gives R = 0; malformed objects are a UserError naming the record."""
    from vlmkit.data.objects import check_objects

    objects = record.get("objects")
    if not objects:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    problem = check_objects(record, (image_width, image_height))
    if problem is not None:
        raise UserError(f"the record of image {record.get('image')!r} {problem}; fix its 'objects'")
    index = {name: i for i, name in enumerate(classes)}
    boxes, labels = [], []
    for obj in objects[:max_regions]:
        x0, y0, x1, y1 = obj["box"]
        (u0, v0), (u1, v1) = point_map(x0, y0), point_map(x1, y1)
        box = [min(u0, u1), min(v0, v1), max(u0, u1), max(v0, v1)]  # a flip swaps x0 and x1
        box = [min(max(value, 0.0), 1.0) * image_size for value in box]
        if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
            boxes.append(box)
            labels.append(index.get(obj["name"], -1))
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long)


def sample_regions(record: dict, image, transform, rng, image_size: int, classes: Sequence[str],
                   max_regions: int) -> dict[str, torch.Tensor]:
    """One sample's `boxes` (R, 4) and `region_labels` (R,) (`record_regions`), mapped through the crop
    and flip `transform` (an ImageTransform) draws from `rng` (in the state the sample's transform started
    from: `ImageTextDataset.transform_rng(index)`); a plain callable transform is taken as a squash resize."""
    if hasattr(transform, "point_map"):
        point_map = transform.point_map(image.width, image.height, rng)
    else:
        point_map = lambda x, y: (x / image.width, y / image.height)  # noqa: E731
    boxes, labels = record_regions(record, image.width, image.height, image_size, point_map, classes, max_regions)
    return {"boxes": boxes, "region_labels": labels}


def collate_regions(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Samples with `boxes` (R_i, 4) and `region_labels` (R_i,) -> `boxes` (B, R, 4), `region_mask`
    (B, R), `region_labels` (B, R) padded to the most boxes (R may be 0)."""
    most = max([len(sample["boxes"]) for sample in samples] + [0])
    boxes = torch.zeros(len(samples), most, 4)
    labels = torch.full((len(samples), most), -1, dtype=torch.long)
    mask = torch.zeros(len(samples), most, dtype=torch.bool)
    for row, sample in enumerate(samples):
        count = len(sample["boxes"])
        boxes[row, :count], labels[row, :count], mask[row, :count] = sample["boxes"], sample["region_labels"], True
    return {"boxes": boxes, "region_mask": mask, "region_labels": labels}


def region_inputs(records: Sequence[dict], transform, visual: VisualInputConfig, image_size: int,
                  classes: Sequence[str]) -> dict[str, torch.Tensor]:
    """`ReadsRegions.region_inputs`: the records' object boxes where the evaluation `transform` puts them
    (`boxes`, `region_mask`, `region_labels`); a record without objects (or `visual.source: grid`) gets none."""
    from vlmkit.data.formats import load_image

    samples = []
    for record in records:
        if not record.get("objects") or visual.source == "grid":
            samples.append({"boxes": torch.zeros(0, 4), "region_labels": torch.zeros(0, dtype=torch.long)})
            continue
        evaluation = transform.eval() if hasattr(transform, "eval") else transform
        samples.append(sample_regions(record, load_image(record["image"]), evaluation, None, image_size, classes,
                                      visual.max_regions))
    return collate_regions(samples)


def region_classes(records: Sequence[dict]) -> list[str]:
    """The sorted object names of the records (what `region_labels` index; a family's `region_classes`)."""
    return sorted({obj["name"] for record in records for obj in record.get("objects") or []
                   if isinstance(obj, dict) and isinstance(obj.get("name"), str)})


def random_regions(batch_size: int, image_size: int, num_classes: int, generator: torch.Generator,
                   most: int = 3) -> dict[str, torch.Tensor]:
    """Random `boxes`, `region_mask`, `region_labels` for a family's dummy batch; the last image has no
    boxes (the grid fallback) and the first one `most` (padding in the others)."""
    corners = torch.rand(batch_size, most, 2, generator=generator) * image_size * 0.5
    sizes = 0.2 * image_size + torch.rand(batch_size, most, 1, generator=generator) * image_size * 0.3
    counts = torch.tensor([most] + [max(1, most - 1)] * max(0, batch_size - 2) + [0])[:batch_size]
    mask = torch.arange(most)[None] < counts[:, None]  # (B, R)
    labels = torch.randint(0, max(num_classes, 1), (batch_size, most), generator=generator).masked_fill(~mask, -1)
    boxes = torch.cat([corners, corners + sizes], dim=-1) * mask[..., None]
    return {"boxes": boxes, "region_mask": mask, "region_labels": labels}
