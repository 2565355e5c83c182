"""Region-of-interest building blocks of two-stage detectors, in plain PyTorch (no torchvision).

- `roi_align`: RoIAlign (Mask R-CNN, "aligned" half-pixel coordinates) written with
  `F.grid_sample`: each output bin averages `sampling_ratio`^2 bilinear samples at evenly spaced
  points inside it, zero outside the feature map (grid_sample's "zeros" padding).
- `box_iou`, `encode_boxes` / `decode_boxes` (Faster R-CNN's (dx, dy, dw, dh) parametrisation,
  with the usual weights), `nms` (greedy, on the CPU or any device, without a Python loop per box pair).

Boxes are `[x0, y0, x1, y1]` in continuous coordinates where pixel i covers [i, i + 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Faster R-CNN's second-stage delta weights
MAX_LOG_SIZE = math.log(1000.0 / 16)  # clamp of dw, dh before exp (detectron2's scale clamp)


def roi_align(features: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor, output_size: int,
              spatial_scale: float = 1.0, sampling_ratio: int = 2) -> torch.Tensor:
    """(B, C, H, W) features, (K, 4) boxes in input coordinates (times `spatial_scale` gives feature
    coordinates), (K,) image index of each box -> (K, C, output_size, output_size) pooled features."""
    height, width = features.shape[-2:]
    points = output_size * sampling_ratio
    boxes = boxes.to(features.dtype) * spatial_scale
    steps = (torch.arange(points, device=features.device, dtype=features.dtype) + 0.5) / points  # (P,) in (0, 1)
    xs = boxes[:, 0:1] + steps[None] * (boxes[:, 2:3] - boxes[:, 0:1])  # (K, P) continuous x
    ys = boxes[:, 1:2] + steps[None] * (boxes[:, 3:4] - boxes[:, 1:2])  # (K, P)
    # grid_sample (align_corners=False) reads normalised -1..1 where -1 is the left edge of pixel 0
    grid_x = (2 * xs / width - 1)[:, None, :].expand(-1, points, -1)   # (K, P, P)
    grid_y = (2 * ys / height - 1)[:, :, None].expand(-1, -1, points)  # (K, P, P)
    grid = torch.stack([grid_x, grid_y], dim=-1)                       # (K, P, P, 2)
    sampled = F.grid_sample(features[batch_index], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)                       # (K, C, P, P)
    return F.avg_pool2d(sampled, sampling_ratio) if sampling_ratio > 1 else sampled


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) -> (N, M) intersection over union (0 where both areas are 0)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-9)


def encode_boxes(reference: torch.Tensor, target: torch.Tensor, weights=BOX_WEIGHTS) -> torch.Tensor:
    """(N, 4) deltas (dx, dy, dw, dh) that move `reference` boxes onto `target` boxes."""
    ref_w, ref_h = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    ref_x, ref_y = reference[:, 0] + 0.5 * ref_w, reference[:, 1] + 0.5 * ref_h
    tgt_w, tgt_h = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    tgt_x, tgt_y = target[:, 0] + 0.5 * tgt_w, target[:, 1] + 0.5 * tgt_h
    wx, wy, ww, wh = weights
    return torch.stack([wx * (tgt_x - ref_x) / ref_w, wy * (tgt_y - ref_y) / ref_h,
                        ww * torch.log(tgt_w / ref_w), wh * torch.log(tgt_h / ref_h)], dim=1)


def decode_boxes(reference: torch.Tensor, deltas: torch.Tensor, weights=BOX_WEIGHTS) -> torch.Tensor:
    """The inverse of `encode_boxes`: (N, 4) reference boxes moved by (N, 4) deltas."""
    ref_w, ref_h = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    ref_x, ref_y = reference[:, 0] + 0.5 * ref_w, reference[:, 1] + 0.5 * ref_h
    wx, wy, ww, wh = weights
    x = ref_x + deltas[:, 0] / wx * ref_w
    y = ref_y + deltas[:, 1] / wy * ref_h
    w = ref_w * torch.exp((deltas[:, 2] / ww).clamp(max=MAX_LOG_SIZE))
    h = ref_h * torch.exp((deltas[:, 3] / wh).clamp(max=MAX_LOG_SIZE))
    return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], dim=1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes greedy non-maximum suppression keeps, in decreasing score order: a box
    is dropped when it overlaps a kept, higher-scoring box by more than `iou_threshold`."""
    order = torch.argsort(scores, descending=True, stable=True)
    overlaps = box_iou(boxes[order], boxes[order]) > iou_threshold  # (N, N)
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):  # one pass over the sorted boxes; each drop is a vector operation
        if keep[i]:
            keep[i + 1:] &= ~overlaps[i, i + 1:]
    return order[keep]
