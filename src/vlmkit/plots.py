"""PNG figures through matplotlib (the `plots` extra): loss curves, similarity matrices, and the
pictures the families share — attention over an image, a captioned sample grid, boxes on an image.

Every figure is a `matplotlib.figure.Figure` with its own Agg canvas: nothing here calls
`matplotlib.use()`, touches pyplot or changes rcParams, so importing or drawing has no effect on
the rest of the process (a notebook's backend, another library's style). Each drawing function
writes its file (atomically: a temporary file renamed into place) and returns the Figure, so a
caller can add to it or a test can read its axes back.

matplotlib is optional: `available()` says whether it can be imported and, asked to, prints the
one-line note that a figure was skipped; the drawing functions raise `PlotsUnavailable` without it.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from vlmkit.errors import UserError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'vlmkit[plots]'"
DPI = 100
LINE, RAW_LINE, HIGHLIGHT = "#1f77b4", "#aec7e8", "#d62728"
# Ticks at 1, 2 or 5 times a power of ten, at most about six of them per axis.
NICE_STEPS = (1, 2, 5, 10)


class PlotsUnavailable(UserError, ImportError):
    """matplotlib (the `plots` extra) is not installed."""


def available(skipping: str | Path | None = None) -> bool:
    """Whether matplotlib can be imported; if not and `skipping` names a figure, say on stderr
    (one line) that it was not drawn and how to get it."""
    try:
        _matplotlib()
    except PlotsUnavailable:
        if skipping is not None:
            print(f"vlmkit: matplotlib is not installed, so {skipping} was not drawn; {INSTALL_HINT} to get it",
                  file=sys.stderr, flush=True)
        return False
    return True


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(f"drawing figures needs matplotlib; {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def new_figure(width: float, height: float) -> "Figure":
    """A Figure of `width` x `height` inches at `DPI`, with its own Agg canvas and constrained layout."""
    Figure, FigureCanvasAgg = _matplotlib()
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(figure)
    return figure


def save(figure: "Figure", path: str | Path) -> "Figure":
    """Write `figure` to `path` (format from the suffix, PNG by default) atomically, as every run file is."""
    from io import BytesIO

    from vlmkit.io import atomic_write_bytes

    path = Path(path)
    encoded = BytesIO()
    figure.savefig(encoded, format=path.suffix.lstrip(".").lower() or "png", dpi=DPI, facecolor="white")
    atomic_write_bytes(path, encoded.getvalue())
    return figure


def nice_axis(axis: "Axis", integer: bool = False, max_ticks: int = 6) -> None:
    """Ticks at round numbers (1, 2 or 5 x 10^k; whole numbers if `integer`), plain labels, no offset."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    axis.set_major_locator(MaxNLocator(nbins=max_ticks, steps=list(NICE_STEPS), integer=integer,
                                        min_n_ticks=2 if integer else 3))
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)


def _style(axes: "Axes", title: str | None = None, xlabel: str | None = None, ylabel: str | None = None) -> None:
    if title:
        axes.set_title(title, fontsize=12, loc="left")
    if xlabel:
        axes.set_xlabel(xlabel, fontsize=10)
    if ylabel:
        axes.set_ylabel(ylabel, fontsize=10)
    axes.tick_params(labelsize=9)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first values averaged with copies of the first)."""
    if window <= 1 or len(values) < window:
        return values
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def line_plot(xs: Sequence[float], ys: Sequence[float], path: str | Path, title: str, xlabel: str, ylabel: str,
              smooth: int = 1) -> "Figure":
    """One series against integer-like x (steps): the raw values faint, their `smooth`-step moving
    average on top; non-finite values are left out. Written to `path`; returns the Figure."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    figure = new_figure(7.2, 4.2)
    axes = figure.add_subplot()
    _style(axes, title, xlabel, ylabel)
    if len(xs) == 0:
        axes.text(0.5, 0.5, "no finite values to plot", ha="center", va="center", transform=axes.transAxes, color="0.4")
        axes.set_xticks([])
        axes.set_yticks([])
        return save(figure, path)
    if smooth > 1 and len(ys) >= smooth:
        axes.plot(xs, ys, color=RAW_LINE, linewidth=1, label=ylabel)
        axes.plot(xs, _smooth(ys, smooth), color=LINE, linewidth=2, label=f"moving average, {smooth} steps")
        axes.legend(fontsize=9, frameon=False)
    else:
        axes.plot(xs, ys, color=LINE, linewidth=2, marker="o" if len(xs) < 20 else None, markersize=3)
    if len(xs) == 1 or xs.min() == xs.max():
        axes.set_xlim(xs[0] - 1, xs[0] + 1)
    else:
        axes.set_xlim(xs.min(), xs.max())
    nice_axis(axes.xaxis, integer=True)
    nice_axis(axes.yaxis)
    axes.grid(True, color="0.9", linewidth=0.8)
    axes.set_axisbelow(True)
    return save(figure, path)


def plot_loss_curve(metrics_jsonl: str | Path, path: str | Path) -> "Figure":
    """Training loss per step from a run's metrics.jsonl (smoothed when there are many steps)."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "loss" in row and row["loss"] is not None]
    steps, losses = [row["step"] for row in rows], [row["loss"] for row in rows]
    return line_plot(steps, losses, path, "training loss", "step", "loss", smooth=max(1, len(steps) // 50))


def _shorten(label: Any, width: int) -> str:
    label = str(label)
    return label if len(label) <= width else label[: width - 1] + "…"


def heatmap(matrix: np.ndarray, path: str | Path, title: str, row_labels: Sequence[str] = (),
            col_labels: Sequence[str] = (), annotate: bool | None = None, label_width: int = 32) -> "Figure":
    """A matrix as a viridis grid with a colour bar, e.g. image-text similarities: labelled rows and
    (slanted) columns, the diagonal outlined when square, values printed in the cells when there
    are few (`annotate`, default: at most 16 x 16). Written to `path`; returns the Figure."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {matrix.shape}")
    rows, cols = matrix.shape
    rows_text = [_shorten(label, label_width) for label in row_labels]
    cols_text = [_shorten(label, label_width) for label in col_labels]
    # Room for the cells (0.42 in each) and the labels (0.065 in per character; columns slant).
    longest_row = 0.065 * max((len(label) for label in rows_text), default=2) + 0.3
    longest_col = 0.065 * max((len(label) for label in cols_text), default=2) + 0.3
    width = min(24.0, 0.42 * cols + longest_row + 1.6)
    height = min(24.0, 0.42 * rows + 0.8 * longest_col + 0.9)
    figure = new_figure(max(width, 4.0), max(height, 3.0))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="viridis", aspect="equal", interpolation="nearest")
    axes.set_title(title, fontsize=11, loc="left")
    axes.set_xticks(range(cols), cols_text if cols_text else [str(j) for j in range(cols)],
                    rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    axes.set_yticks(range(rows), rows_text if rows_text else [str(i) for i in range(rows)], fontsize=8)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    if rows == cols:
        from matplotlib.patches import Rectangle

        for i in range(rows):
            axes.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=HIGHLIGHT, linewidth=1.5))
    if annotate is None:
        annotate = max(rows, cols) <= 16
    if annotate:
        low, high = float(np.nanmin(matrix)), float(np.nanmax(matrix))
        middle = (low + high) / 2
        for i in range(rows):
            for j in range(cols):
                axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                          color="black" if matrix[i, j] > middle else "white")
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8, pad=0.02)
    nice_axis(colorbar.ax.yaxis)
    colorbar.ax.tick_params(labelsize=8)
    return save(figure, path)


def to_image_array(image: Any) -> np.ndarray:
    """An image as an (H, W, 3) or (H, W) array for drawing: a path, a PIL image, a NumPy array
    (uint8, or floats in [0, 1]) or a (C, H, W) tensor in [0, 1] (undo any normalisation first)."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (3, H, W), got {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array.astype(float), 0.0, 1.0)
    return array


def _image_axes(axes: "Axes", image: np.ndarray, caption: str | None = None, width: int = 28) -> None:
    axes.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    if caption:
        axes.set_title("\n".join(textwrap.wrap(str(caption), width)[:3]), fontsize=8)


def attention_map(image: Any, weights: np.ndarray | Sequence[np.ndarray], path: str | Path,
                  titles: Sequence[str] = (), title: str | None = None, alpha: float = 0.55) -> "Figure":
    """Where a model looks: the image, then one panel per map in `weights` (e.g. a patch grid of
    attention from a token, per head), each map stretched over the image and overlaid in `magma`
    with a shared colour scale. Written to `path`; returns the Figure."""
    picture = to_image_array(image)
    maps = [np.asarray(weights, dtype=float)] if np.ndim(weights) == 2 else [np.asarray(w, dtype=float) for w in weights]
    if any(m.ndim != 2 for m in maps):
        raise ValueError("attention_map needs 2-D maps (a (rows, cols) grid each)")
    height, width = picture.shape[:2]
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    figure = new_figure(2.2 * (len(maps) + 1) + 0.6, 2.6 if title else 2.4)
    panels = figure.subplots(1, len(maps) + 1, squeeze=False)[0]
    _image_axes(panels[0], picture, "image")
    for index, (axes, grid) in enumerate(zip(panels[1:], maps)):
        _image_axes(axes, picture, titles[index] if index < len(titles) else None)
        # extent stretches the grid over the picture, nearest keeps the patches visible.
        overlay = axes.imshow(grid, cmap="magma", alpha=alpha, vmin=low, vmax=high if high > low else low + 1e-12,
                              extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
    if maps:
        colorbar = figure.colorbar(overlay, ax=list(panels[1:]), shrink=0.85, pad=0.02)
        nice_axis(colorbar.ax.yaxis)
        colorbar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=11, x=0.01, ha="left")
    return save(figure, path)


def image_grid(images: Sequence[Any], captions: Sequence[str], path: str | Path, columns: int = 4,
               title: str | None = None, wrap: int = 28) -> "Figure":
    """Sample images in a grid, each with its caption (wrapped, up to three lines) above it, e.g.
    generated captions or generated images with their prompts. Written to `path`; returns the Figure."""
    if len(images) != len(captions):
        raise ValueError(f"image_grid got {len(images)} images and {len(captions)} captions")
    count = max(1, len(images))
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    figure = new_figure(2.3 * columns, 2.5 * rows + (0.4 if title else 0))
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, image, caption in zip(panels, images, captions):
        _image_axes(axes, to_image_array(image), caption, width=wrap)
    for axes in panels[len(images):]:
        axes.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=11, x=0.01, ha="left")
    return save(figure, path)


def boxes_on_image(image: Any, boxes: Sequence[Sequence[float]], path: str | Path, labels: Sequence[str] = (),
                   scores: Sequence[float] = (), title: str | None = None) -> "Figure":
    """Boxes (pixel x0, y0, x1, y1) drawn on the image, one colour per label, each tagged with its
    label and score when given, e.g. detections or the built-in data's `objects`. Written to
    `path`; returns the Figure."""
    from matplotlib.patches import Rectangle

    picture = to_image_array(image)
    height, width = picture.shape[:2]
    scale = 5.0 / max(height, width)
    figure = new_figure(max(2.5, width * scale + 0.3), max(2.5, height * scale + (0.6 if title else 0.3)))
    axes = figure.add_subplot()
    _image_axes(axes, picture)
    if title:
        axes.set_title(title, fontsize=10, loc="left")
    palette = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf", "#999999"]
    colours: dict[str, str] = {}
    for index, box in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box)
        label = str(labels[index]) if index < len(labels) else ""
        colour = colours.setdefault(label, palette[len(colours) % len(palette)])
        axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
        tag = label + (f" {float(scores[index]):.2f}" if index < len(scores) else "")
        if tag.strip():
            axes.text(x0 - 0.5, y0 - 0.5, tag.strip(), fontsize=8, color="white", va="bottom", ha="left",
                      bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5, "alpha": 0.85}, clip_on=True)
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    return save(figure, path)
