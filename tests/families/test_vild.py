"""ViLD's own behaviour: RoIAlign against a direct computation, box coding, NMS, training on scenes
whose held-out classes are never labelled, detection by name, bad boxes skipped and counted."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vlmkit.layers.roi import box_iou, decode_boxes, encode_boxes, nms, roi_align


def _bilinear_zero_padded(feature: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """feature (C, H, W) at continuous (x, y), pixel i covering [i, i + 1): bilinear between pixel
    centres, zero outside the map (what grid_sample's 'zeros' padding gives)."""
    channels, height, width = feature.shape
    px, py = x - 0.5, y - 0.5  # in pixel-centre index space
    x0, y0 = math.floor(px), math.floor(py)
    value = torch.zeros(channels, dtype=torch.float64)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < width and 0 <= yi < height:
                value += weight * feature[:, yi, xi].double()
    return value


def test_roi_align_equals_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 6, 7, generator=generator, dtype=torch.float64)
    boxes = torch.tensor([[0.3, 0.2, 5.1, 4.4], [2.0, 1.0, 3.0, 2.5], [-1.0, -0.5, 8.0, 6.5]], dtype=torch.float64)
    batch_index = torch.tensor([0, 1, 1])
    size, sampling = 3, 2
    ours = roi_align(features, boxes * 4, batch_index, size, spatial_scale=0.25, sampling_ratio=sampling)
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        bin_w, bin_h = (x1 - x0) / size, (y1 - y0) / size
        for row in range(size):
            for col in range(size):
                samples = [_bilinear_zero_padded(features[batch_index[k]], x0 + (col + (sx + 0.5) / sampling) * bin_w,
                                                 y0 + (row + (sy + 0.5) / sampling) * bin_h)
                           for sy in range(sampling) for sx in range(sampling)]
                expected = torch.stack(samples).mean(dim=0)
                assert torch.allclose(ours[k, :, row, col], expected, atol=1e-10), (k, row, col)


def test_box_coding_round_trip_iou_and_nms():
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 15.0]])
    target = torch.tensor([[1.0, 2.0, 12.0, 9.0], [4.0, 4.0, 10.0, 20.0]])
    assert torch.allclose(decode_boxes(reference, encode_boxes(reference, target)), target, atol=1e-5)
    assert box_iou(reference[:1], torch.tensor([[5.0, 0.0, 15.0, 10.0]])).item() == pytest.approx(1 / 3)
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 1, 10, 11]])
    assert nms(boxes, torch.tensor([0.9, 0.95, 0.5, 0.1]), 0.5).tolist() == [1, 2]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from vlmkit.data.synthetic import generate

    out = tmp_path_factory.mktemp("vild-synth")
    generate(out, n=50, seed=3, image_size=64, holdout=["red triangle"], progress=False)
    return out


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory):
    from vlmkit.cli import main

    import contextlib
    import io

    # one bad record: a box outside the image; training skips and counts it
    records = [json.loads(line) for line in (scenes / "train.jsonl").read_text().splitlines()]
    records[0]["objects"][0]["box"] = [50, 50, 90, 60]
    data = scenes / "train-bad.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path_factory.mktemp("vild-run") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", "--recipe", "vild-tiny", "--data", str(data), "--out", str(out), "steps=3",
                     "batch_size=8", "warmup_steps=1", "save_every=3", "init_text=null", "init_image=null"]) == 0
    return out, json.loads(stdout.getvalue())


def test_training_never_sees_held_out_classes_and_skips_bad_boxes(run):
    from vlmkit.models.vild import BAD_BOXES

    folder, summary = run
    config = json.loads((folder / "config.json").read_text())["config"]
    assert "red triangle" not in config["classes"] and len(config["classes"]) >= 5
    assert summary["skipped"] >= 1 and summary["skip_reasons"][BAD_BOXES] == summary["skipped"]
    assert summary["skipped_examples"][0].endswith("train-000000.png")


def test_detect_by_name_includes_novel_classes(run, scenes, capsys):
    import vlmkit
    from vlmkit.data.formats import load_image, read_records
    from vlmkit.tasks.detection import evaluate_detection

    model = vlmkit.load(run[0])
    records = read_records(scenes / "test.jsonl")
    pixels = model.detection_inputs([load_image(records[0]["image"])])
    found = model.detect(pixels, ["red triangle", "blue circle"])[0]
    assert found["boxes"].shape[1] == 4 and len(found["boxes"]) == len(found["scores"]) == len(found["labels"])
    assert set(found["labels"].tolist()) <= {0, 1}
    result = evaluate_detection(model, records, novel=["red triangle"])
    assert result["novel"] is not None and -1 <= result["novel"]["AP"] <= 1 and "red triangle" in result["classes"]


def test_detect_cli_prints_boxes_and_draws_them(run, scenes, tmp_path, capsys):
    from vlmkit.cli import main
    from vlmkit.data.formats import read_records

    image = read_records(scenes / "test.jsonl")[0]["image"]
    out = tmp_path / "figs" / "boxes.png"
    assert main(["detect", image, "--model", str(run[0]), "--labels", "red triangle", "blue circle",
                 "--threshold", "0", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    detections = printed["predictions"][0]["detections"]
    assert detections and {d["label"] for d in detections} <= {"red triangle", "blue circle"}
    assert all(0 <= v <= 64 for d in detections for v in d["box"]) and out.read_bytes()[:4] == b"\x89PNG"


def test_eval_detection_cli_bad_box_is_one_line_exit_2(run, scenes, tmp_path, capsys):
    from vlmkit.cli import main

    records = [json.loads(line) for line in (scenes / "test.jsonl").read_text().splitlines()][:3]
    records[1]["objects"][0]["box"] = [5, 5, 5, 9]
    data = scenes / "test-bad.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["eval", "detection", "--model", str(run[0]), "--data", str(data)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "zero area" in captured.err and "Traceback" not in captured.err
    assert main(["detect", str(tmp_path / "missing.png"), "--model", str(run[0]), "--labels", "red circle"]) == 2
