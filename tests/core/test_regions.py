"""encoders/regions.py: region pooling against a direct computation, geometry, grid fallback, boxes through crops."""
from __future__ import annotations

import math

import pytest
import torch

from vlmkit.encoders.regions import (VisualInputConfig, VisualInputs, box_geometry, collate_regions, grid_regions,
                                     label_distribution, pool_regions, record_regions, sample_cells)
from vlmkit.errors import UserError


def _bilinear(grid: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Direct bilinear read of a (C, H, W) map at continuous (x, y), pixel i centred at i + 0.5, zero outside."""
    channels, height, width = grid.shape
    px, py = x - 0.5, y - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    value = torch.zeros(channels, dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < width and 0 <= yi < height:
                value += weight * grid[:, yi, xi].double()
    return value


def _direct_pool(grid: torch.Tensor, box, scale: float, bins: int, ratio: int) -> torch.Tensor:
    """RoIAlign + mean over bins written as loops: the mean of bins*ratio squared evenly spaced samples."""
    x0, y0, x1, y1 = (value * scale for value in box)
    points = bins * ratio
    samples = [_bilinear(grid, x0 + (i + 0.5) / points * (x1 - x0), y0 + (j + 0.5) / points * (y1 - y0))
               for i in range(points) for j in range(points)]
    return torch.stack(samples).mean(0)


def test_pool_regions_matches_direct_computation():
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 5, 4, 4, generator=generator)  # (B, C, g, g) of a 32 px image: 8 px per cell
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 17.5, 30.0]],
                          [[10.0, 2.0, 14.0, 9.0], [20.0, 20.0, 31.0, 27.0]]])
    pooled = pool_regions(grid, boxes, image_size=32, roi_size=2, sampling_ratio=2)  # (B, R, C)
    assert pooled.shape == (2, 2, 5)
    for b in range(2):
        for r in range(2):
            expected = _direct_pool(grid[b], boxes[b, r].tolist(), 4 / 32, 2, 2)
            assert torch.allclose(pooled[b, r].double(), expected, atol=1e-5), (b, r)
    # the whole-image box at ratio 1 with 4 bins is exactly the grid's mean (each sample at a cell centre)
    whole = pool_regions(grid, torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(2, 1, 4), image_size=32, roi_size=4,
                         sampling_ratio=1)[:, 0]
    assert torch.allclose(whole, grid.mean(dim=(2, 3)), atol=1e-6)


def test_box_geometry_and_grid_cells():
    geometry = box_geometry(torch.tensor([[8.0, 16.0, 40.0, 32.0]]), 64)
    assert torch.allclose(geometry, torch.tensor([[0.125, 0.25, 0.625, 0.5, 0.5, 0.25, 0.125]]))
    grid = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    features, cells = grid_regions(grid, 64)
    assert features.shape == (2, 4, 3) and torch.equal(features[0, 1], grid[0, :, 0, 1])  # row-major
    assert cells[0].tolist() == [[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]]
    keep = sample_cells(3, 10, 0.35, "cpu", torch.Generator().manual_seed(1))
    assert keep.shape == (3, 4) and all(len(set(row.tolist())) == 4 for row in keep)
    assert torch.equal(keep, keep.sort(dim=1).values)


def test_label_distribution_covers_and_sums_to_one():
    cells = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [0.0, 0.0, 4.0, 4.0]]])
    objects = torch.tensor([[[0.0, 0.0, 5.0, 10.0], [0.0, 0.0, 1.0, 1.0]]])
    labels = torch.tensor([[1, -1]])  # the second object is padding
    dist = label_distribution(cells, torch.ones(1, 3, dtype=torch.bool), objects, labels, num_classes=2)
    assert dist.shape == (1, 3, 3)
    assert torch.allclose(dist[0, 0], torch.tensor([0.5, 0.0, 0.5]))  # half of the cell is class 1
    assert torch.allclose(dist[0, 1], torch.tensor([1.0, 0.0, 0.0]))  # all background
    assert torch.allclose(dist[0, 2], torch.tensor([0.0, 0.0, 1.0]))  # inside the object
    assert torch.allclose(dist.sum(-1), torch.ones(1, 3))


def test_visual_inputs_mix_regions_and_grid_per_sample():
    grid = torch.randn(2, 6, 4, 4)
    samples = [{"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 8.0, 30.0, 24.0]]),
                "region_labels": torch.tensor([0, 1])},
               {"boxes": torch.zeros(0, 4), "region_labels": torch.zeros(0, dtype=torch.long)}]
    batch = collate_regions(samples)
    assert batch["boxes"].shape == (2, 2, 4) and batch["region_mask"].tolist() == [[True, True], [False, False]]
    inputs = VisualInputs(VisualInputConfig(source="auto"), image_size=32, num_classes=2)
    tokens = inputs(grid, batch)
    # 1 whole-image token + 2 regions + 16 grid cells; the first image uses its regions, the second its grid
    assert tokens.features.shape == (2, 19, 6) and tokens.geometry.shape == (2, 19, 7)
    assert tokens.mask[0].tolist() == [True, True, True] + [False] * 16
    assert tokens.mask[1].tolist() == [True, False, False] + [True] * 16
    assert torch.allclose(tokens.features[1, 3:], grid[1].flatten(1).t())
    assert tokens.labels.shape == (2, 19, 3) and torch.allclose(tokens.labels[0, 1], torch.tensor([0.0, 1.0, 0.0]))
    # Pixel-BERT sampling in training: half of the cells
    inputs.train()
    inputs.config.grid_keep = 0.5
    assert inputs(grid, batch, torch.Generator().manual_seed(0)).features.shape == (2, 11, 6)
    with pytest.raises(UserError, match="visual.source=auto"):
        VisualInputs(VisualInputConfig(source="regions"), 32)(grid, batch)
    only_grid = VisualInputs(VisualInputConfig(source="grid", image_region=False), 32)(grid, batch)
    assert only_grid.features.shape == (2, 16, 6) and bool(only_grid.mask.all())


def test_record_regions_follow_the_crop_and_flip():
    record = {"image": "x.png", "objects": [{"name": "red circle", "box": [10, 20, 30, 40]},
                                            {"name": "blue square", "box": [90, 90, 100, 100]}]}

    def flip_half(x, y):  # the left half of a 100 px image, flipped
        return 1 - x / 50, y / 100
    boxes, labels = record_regions(record, 100, 100, 64, flip_half, ["red circle"], max_regions=8)
    assert labels.tolist() == [0]  # the second box is cut off by the crop
    assert torch.allclose(boxes, torch.tensor([[0.4 * 64, 0.2 * 64, 0.8 * 64, 0.4 * 64]]))
    with pytest.raises(UserError, match="x.png"):
        record_regions({"image": "x.png", "objects": [{"name": "a", "box": [5, 5, 5, 9]}]}, 100, 100, 64,
                       flip_half, [], 8)
    assert record_regions({"image": "y.png"}, 100, 100, 64, flip_half, [], 8)[0].shape == (0, 4)


def test_sample_regions_land_on_the_object_after_the_training_crop():
    import random

    from PIL import Image, ImageDraw

    from vlmkit.data.transforms import ImageTransform
    from vlmkit.encoders.regions import sample_regions

    image = Image.new("RGB", (120, 90), "white")
    ImageDraw.Draw(image).rectangle([30, 20, 69, 59], fill="black")  # pixels 30..69 x 20..59: box [30, 20, 70, 60]
    record = {"image": "x.png", "objects": [{"name": "black square", "box": [30, 20, 70, 60]}]}
    transform = ImageTransform(image_size=48, train=True, crop_scale=(0.6, 0.9), hflip=0.5)
    for seed in range(4):
        pixels = transform(image, random.Random(seed))  # (3, 48, 48), normalised
        regions = sample_regions(record, image, transform, random.Random(seed), 48, ["black square"], 4)
        assert regions["region_labels"].tolist() == [0]
        x0, y0, x1, y1 = [int(round(v)) for v in regions["boxes"][0].tolist()]
        dark = pixels.mean(0) < 0  # below the mean grey: the black square
        inside = dark[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
        assert inside.float().mean() > 0.95, seed
        assert dark.sum() <= (x1 - x0 + 2) * (y1 - y0 + 2), seed  # nothing dark outside the box (1 px of blur)
