"""Figures: valid PNGs of a sensible size, round tick labels, no process-wide matplotlib state,
and training that goes on (with one note) when matplotlib is missing."""
import json
import math
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit import plots
from vlmkit.cli import main

from core_helpers import FAST


def _png(path, min_side=200, max_side=2500):
    with Image.open(path) as image:
        image.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert min_side <= width <= max_side and min_side <= height <= max_side, (width, height)
    return width, height


def _visible_ticks(axis):
    """(tick values, their label texts) of the ticks inside the view, as drawn."""
    low, high = sorted(axis.get_view_interval())
    pairs = [(tick, label.get_text()) for tick, label in zip(axis.get_majorticklocs(), axis.get_ticklabels())]
    return zip(*[(tick, text) for tick, text in pairs if low - 1e-9 <= tick <= high + 1e-9])


def _assert_nice(axis, integer=False):
    values, texts = (list(part) for part in _visible_ticks(axis))
    assert 3 <= len(values) <= 9, values
    steps = np.diff(values)
    step = float(steps[0])
    assert np.allclose(steps, step), values
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, nice) for nice in (1, 2, 5)), (step, values)
    for value, text in zip(values, texts):
        assert math.isclose(value / step, round(value / step), abs_tol=1e-6), values  # multiples of the step
        assert math.isclose(float(text.replace("\N{MINUS SIGN}", "-")), value, abs_tol=step / 100), (text, value)
        assert len(text) <= 6 and "e" not in text, text
        if integer:
            assert text.lstrip("\N{MINUS SIGN}").isdigit(), text


def _metrics(path, losses):
    path.write_text("".join(json.dumps({"step": step, "loss": loss, "lr": 1e-3}) + "\n" for step, loss in enumerate(losses, 1)))
    return path


@pytest.mark.parametrize("losses", [
    list(4.8 * np.exp(-np.arange(300) / 60) + 0.1 + 0.05 * np.sin(np.arange(300))),  # the demo's shape
    list(np.linspace(2.98, 0.943, 40)),  # the range the hand-drawn axes labelled 0.943, 1.96, 2.98
    [0.95, 0.9431],  # two steps, a tiny range
])
def test_loss_curve_is_a_png_with_round_ticks(tmp_path, losses):
    figure = plots.plot_loss_curve(_metrics(tmp_path / "metrics.jsonl", losses), tmp_path / "loss.png")
    assert _png(tmp_path / "loss.png") == (720, 420)
    (axes,) = figure.axes
    _assert_nice(axes.yaxis)
    values, _ = _visible_ticks(axes.xaxis)
    assert all(float(v).is_integer() for v in values), values  # steps are whole numbers
    if len(losses) > 2:
        _assert_nice(axes.xaxis, integer=True)
    assert axes.get_title(loc="left") == "training loss" and axes.get_xlabel() == "step" and axes.get_ylabel() == "loss"
    assert not list(tmp_path.glob("*.tmp"))


def test_loss_curve_without_finite_values_still_writes_a_png(tmp_path):
    plots.plot_loss_curve(_metrics(tmp_path / "metrics.jsonl", [float("nan"), float("inf")]), tmp_path / "loss.png")
    _png(tmp_path / "loss.png")


def test_similarity_heatmap_labels_diagonal_and_colour_bar(tmp_path):
    matrix = np.random.default_rng(0).uniform(-0.2, 0.9, (12, 12))
    captions = [f"a red circle above a blue square number {i}" for i in range(12)]
    figure = plots.heatmap(matrix, tmp_path / "sim.png", "similarity", row_labels=[f"class {i}" for i in range(12)], col_labels=captions)
    _png(tmp_path / "sim.png", min_side=400)
    axes, colorbar = figure.axes
    assert [label.get_text() for label in axes.get_yticklabels()] == [f"class {i}" for i in range(12)]
    assert all(label.get_text().endswith("…") and len(label.get_text()) == 32 for label in axes.get_xticklabels())
    assert len(axes.patches) == 12  # the outlined diagonal
    assert len(axes.texts) == 144  # a value in every cell
    _assert_nice(colorbar.yaxis)
    wide = plots.heatmap(np.ones((3, 5)), tmp_path / "wide.png", "constant")
    assert len(wide.axes[0].patches) == 0  # no diagonal when not square
    _png(tmp_path / "wide.png")


def test_attention_map_overlays_each_map_on_the_image(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    maps = [np.random.default_rng(seed).random((8, 8)) for seed in range(3)]
    figure = plots.attention_map(image, maps, tmp_path / "attention.png", titles=["head 0", "head 1", "head 2"], title="[CLS]")
    width, height = _png(tmp_path / "attention.png")
    assert width > 2 * height  # a row of panels
    panels = figure.axes[:4]
    assert [axes.get_title() for axes in panels] == ["image", "head 0", "head 1", "head 2"]
    assert all(len(axes.images) == 2 for axes in panels[1:])  # the image and its overlay
    assert panels[1].images[1].get_extent() == [-0.5, 63.5, 63.5, -0.5]  # stretched over the whole image
    plots.attention_map(torch.rand(3, 32, 32), np.eye(4), tmp_path / "one.png")  # a tensor and a single map
    _png(tmp_path / "one.png")
    with pytest.raises(ValueError):
        plots.attention_map(image, np.ones(8), tmp_path / "bad.png")


def test_image_grid_captions_every_image(synth, tmp_path):
    records = [json.loads(line) for line in (synth / "train.jsonl").read_text().splitlines()][:5]
    images = [synth / record["image"] for record in records]
    captions = [record["texts"][0] for record in records]
    figure = plots.image_grid(images, captions, tmp_path / "grid.png", columns=3, title="samples")
    _png(tmp_path / "grid.png")
    assert len(figure.axes) == 6 and not figure.axes[5].axison  # 2 x 3, the spare cell blank
    assert [axes.get_title().replace("\n", " ") for axes in figure.axes[:5]] == captions
    with pytest.raises(ValueError):
        plots.image_grid(images, captions[:2], tmp_path / "bad.png")


def test_boxes_on_image_draws_each_box_with_its_tag(synth, tmp_path):
    record = next(r for r in map(json.loads, (synth / "train.jsonl").read_text().splitlines()) if len(r["objects"]) >= 2)
    boxes = [obj["box"] for obj in record["objects"]]
    names = [obj["name"] for obj in record["objects"]]
    figure = plots.boxes_on_image(synth / record["image"], boxes, tmp_path / "boxes.png", labels=names, scores=[0.9] * len(boxes))
    _png(tmp_path / "boxes.png")
    (axes,) = figure.axes
    assert len(axes.patches) == len(boxes)
    x0, y0, x1, y1 = boxes[0]
    assert axes.patches[0].get_bbox().bounds == (x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0)
    assert [text.get_text() for text in axes.texts] == [f"{name} 0.90" for name in names]


def test_drawing_leaves_no_process_wide_matplotlib_state(tmp_path):
    code = (
        "import sys, numpy as np, matplotlib; from vlmkit import plots\n"
        "backend = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        f"plots.line_plot([1, 2, 3], [3.0, 2.0, 1.0], {str(tmp_path / 'a.png')!r}, 't', 'step', 'loss')\n"
        f"plots.heatmap(np.eye(3), {str(tmp_path / 'b.png')!r}, 't')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == backend, 'the backend changed'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib (and of its already-loaded submodules) fail, as if it were not installed."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_without_matplotlib_drawing_says_how_to_install_it(no_matplotlib, tmp_path, capsys):
    assert plots.available() is False
    assert capsys.readouterr().err == ""
    assert plots.available(skipping=tmp_path / "x.png") is False
    assert "pip install 'vlmkit[plots]'" in capsys.readouterr().err
    with pytest.raises(plots.PlotsUnavailable, match=r"pip install 'vlmkit\[plots\]'"):
        plots.heatmap(np.eye(2), tmp_path / "x.png", "t")
    assert not (tmp_path / "x.png").exists()


def test_training_without_matplotlib_skips_the_loss_curve_with_one_note(no_matplotlib, synth, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--recipe", "clip-vit-tiny", "--data", str(synth / "train.jsonl"), "--out", str(run), "steps=2"]
    assert main(args + FAST) == 0
    assert (run / "model.safetensors").exists() and not (run / "loss_curve.png").exists()
    notes = [line for line in capsys.readouterr().err.splitlines() if "vlmkit[plots]" in line]
    assert len(notes) == 1 and "loss_curve.png" in notes[0], notes
