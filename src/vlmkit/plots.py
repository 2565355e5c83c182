"""PNG figures drawn with Pillow alone (no matplotlib): loss curves and similarity matrices."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY, BLUE = (255, 255, 255), (20, 20, 20), (200, 200, 200), (31, 119, 180)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def line_plot(xs: Sequence[float], ys: Sequence[float], path: str | Path, title: str, xlabel: str, ylabel: str, smooth: int = 1) -> None:
    """A single-series line chart with axes, ticks and a title, written as PNG."""
    width, height, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    font = _font(13)
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    draw.text((left, 10), title, fill=BLACK, font=_font(16))
    if len(xs) == 0:
        image.save(path)
        return
    ys_drawn = _smooth(ys, smooth)
    x_min, x_max = float(xs.min()), float(max(xs.max(), xs.min() + 1))
    y_min, y_max = float(ys_drawn.min()), float(ys_drawn.max())
    if y_max - y_min < 1e-12:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(x, y):
        return left + (x - x_min) / (x_max - x_min) * plot_w, top + (1 - (y - y_min) / (y_max - y_min)) * plot_h

    for tick in range(5):
        y = y_min + (y_max - y_min) * tick / 4
        _, py = to_px(x_min, y)
        draw.line([(left, py), (width - right, py)], fill=GREY)
        draw.text((5, py - 7), f"{y:.3g}", fill=BLACK, font=font)
        x = x_min + (x_max - x_min) * tick / 4
        px, _ = to_px(x, y_min)
        draw.text((px - 10, height - bottom + 5), f"{x:.0f}", fill=BLACK, font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=BLACK)
    if smooth > 1:
        draw.line([to_px(x, y) for x, y in zip(xs, ys)], fill=(180, 200, 230), width=1)
    draw.line([to_px(x, y) for x, y in zip(xs, ys_drawn)], fill=BLUE, width=2)
    draw.text((left + plot_w // 2 - 20, height - 22), xlabel, fill=BLACK, font=font)
    draw.text((5, top - 18), ylabel, fill=BLACK, font=font)
    image.save(path)


def plot_loss_curve(metrics_jsonl: str | Path, path: str | Path) -> None:
    """Training loss per step from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    steps = [row["step"] for row in rows if "loss" in row]
    losses = [row["loss"] for row in rows if "loss" in row]
    line_plot(steps, losses, path, "training loss", "step", "loss", smooth=max(1, len(steps) // 50))


def heatmap(matrix: np.ndarray, path: str | Path, title: str, row_labels: Sequence[str] = (), col_labels: Sequence[str] = (), cell: int = 22) -> None:
    """A matrix as a colour grid (viridis-like ramp), e.g. image-text similarities; diagonal outlined."""
    matrix = np.asarray(matrix, dtype=float)
    rows, cols = matrix.shape
    label_w = 150 if row_labels else 10
    label_h = 150 if col_labels else 10
    width, height = label_w + cols * cell + 20, 40 + label_h + rows * cell + 10
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    font = _font(11)
    draw.text((10, 10), title, fill=BLACK, font=_font(15))
    low, high = float(matrix.min()), float(matrix.max())
    scaled = (matrix - low) / max(high - low, 1e-12)
    ramp = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)
    top = 40 + label_h
    for i in range(rows):
        for j in range(cols):
            position = scaled[i, j] * (len(ramp) - 1)
            k = min(int(position), len(ramp) - 2)
            color = tuple(int(c) for c in ramp[k] + (ramp[k + 1] - ramp[k]) * (position - k))
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color)
            if i == j:
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(255, 60, 60))
    for i, label in enumerate(row_labels):
        draw.text((5, top + i * cell + cell // 4), str(label)[:24], fill=BLACK, font=font)
    if col_labels:
        strip = Image.new("RGB", (label_h, cols * cell), WHITE)
        strip_draw = ImageDraw.Draw(strip)
        for j, label in enumerate(col_labels):
            strip_draw.text((5, j * cell + cell // 4), str(label)[:24], fill=BLACK, font=font)
        image.paste(strip.rotate(90, expand=True), (label_w, 40))
    image.save(path)
