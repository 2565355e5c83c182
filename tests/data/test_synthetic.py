"""The built-in synthetic dataset: determinism, holdout, schema and self-consistent annotations."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.synthetic import CLASSES, COLOR_RGB, COLORS, SHAPES, generate
from vlmkit.errors import UserError


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def all_files(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(first, n=40, seed=7, progress=False)
    generate(second, n=40, seed=7, progress=False)
    generate(other, n=40, seed=8, progress=False)
    files_first = all_files(first)
    assert len(files_first) == 40 + 3  # images + train.jsonl + test.jsonl + meta.json
    assert files_first == all_files(second)
    files_other = all_files(other)
    assert files_other["train.jsonl"] != files_first["train.jsonl"]
    assert files_other["images/train-000000.png"] != files_first["images/train-000000.png"]


def test_regenerating_smaller_removes_stale_images(tmp_path):
    generate(tmp_path, n=30, seed=0, progress=False)
    counts = generate(tmp_path, n=10, seed=0, progress=False)
    assert len(list((tmp_path / "images").glob("*.png"))) == 10
    assert counts["train"] + counts["test"] == 10


def test_counts_and_split(synth_dir):
    train, test = read(synth_dir / "train.jsonl"), read(synth_dir / "test.jsonl")
    assert (len(train), len(test)) == (192, 48)
    for records in (train, test):
        single = sum(1 for record in records if len(record["objects"]) == 1)
        assert abs(single / len(records) - 0.4) < 0.02
        assert {len(record["objects"]) for record in records} == {1, 2, 3, 4}
    meta = json.loads((synth_dir / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and len(CLASSES) == len(COLORS) * len(SHAPES) == 24


def test_record_schema_labels_and_boxes(synth_dir):
    for split in ("train", "test"):
        for record in read(synth_dir / f"{split}.jsonl"):
            assert set(record) <= {"image", "texts", "label", "qa", "statements", "objects", "dialogues"}
            assert re.fullmatch(rf"images/{split}-\d{{6}}\.png", record["image"])
            assert record["texts"] and all(isinstance(text, str) and text for text in record["texts"])
            assert len(set(record["texts"])) == len(record["texts"]) >= 3
            objects = record["objects"]
            names = [obj["name"] for obj in objects]
            assert len(set(names)) == len(names)  # referring expressions are unique
            if len(objects) == 1:
                assert record["label"] == names[0]
                color, shape = record["label"].split()
                assert color in COLORS and shape in SHAPES
                assert any(record["label"] in text for text in record["texts"])
            else:
                assert "label" not in record
            image = Image.open(synth_dir / record["image"])
            assert image.size == (64, 64) and image.mode == "RGB"
            pixels = np.asarray(image).astype(int)
            for index, obj in enumerate(objects):
                x0, y0, x1, y1 = obj["box"]
                assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 >= 6
                for other in objects[index + 1:]:  # boxes never overlap
                    ox0, oy0, ox1, oy1 = other["box"]
                    assert x1 <= ox0 or ox1 <= x0 or y1 <= oy0 or oy1 <= y0
                # The object is really drawn: its box centre has its colour (jitter is +-12).
                centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
                expected = np.array(COLOR_RGB[obj["name"].split()[0]])
                assert np.abs(centre - expected).max() <= 20, (record["image"], obj)


def _centre(obj):
    x0, y0, x1, y1 = obj["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def test_qa_answers_follow_from_objects(synth_dir):
    types_seen = set()
    for record in read(synth_dir / "train.jsonl") + read(synth_dir / "test.jsonl"):
        by_name = {obj["name"]: obj for obj in record["objects"]}
        colors = [name.split()[0] for name in by_name]
        shapes = [name.split()[1] for name in by_name]
        for item in record["qa"]:
            question, answer, kind = item["question"], item["answer"], item["type"]
            types_seen.add(kind)
            if question == "how many objects are there?":
                assert answer == str(len(by_name))
            elif match := re.fullmatch(r"how many (\w+)s are there\?", question):
                assert answer == str(shapes.count(match.group(1)))
            elif match := re.fullmatch(r"what color is the (\w+)\?", question):
                assert shapes.count(match.group(1)) == 1 and kind == "color"
                assert answer == colors[shapes.index(match.group(1))]
            elif match := re.fullmatch(r"what shape is the (\w+) object\?", question):
                assert colors.count(match.group(1)) == 1 and kind == "shape"
                assert answer == shapes[colors.index(match.group(1))]
            elif match := re.fullmatch(r"is there an? (\w+ \w+)\?", question):
                assert kind == "yesno" and answer == ("yes" if match.group(1) in by_name else "no")
            elif match := re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", question):
                assert kind == "relation"
                (ax, ay), (bx, by) = _centre(by_name[match.group(1)]), _centre(by_name[match.group(3)])
                truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[match.group(2)]
                assert answer == ("yes" if truth else "no")
                # Only clearly separated pairs are asked about.
                gap = abs(ax - bx) if match.group(2) in ("left of", "right of") else abs(ay - by)
                assert gap >= 0.2 * 64
            else:
                pytest.fail(f"unexpected question {question!r}")
    assert types_seen == {"color", "shape", "count", "relation", "yesno"}


def test_statements_are_balanced_and_true_ones_hold(synth_dir):
    for record in read(synth_dir / "train.jsonl"):
        labels = [item["label"] for item in record["statements"]]
        assert labels.count(True) == labels.count(False) >= 2
        names = {obj["name"] for obj in record["objects"]}
        for item in record["statements"]:
            if match := re.fullmatch(r"there is an? (\w+ \w+)", item["text"]):
                assert item["label"] == (match.group(1) in names)
            elif match := re.fullmatch(r"there (?:is|are) (\w+) objects?", item["text"]):
                count = ["one", "two", "three", "four"].index(match.group(1)) + 1
                assert item["label"] == (count == len(names))
            elif match := re.fullmatch(r"the (\w+) is (\w+)", item["text"]):
                (owner,) = [name for name in names if name.endswith(" " + match.group(1))]
                assert item["label"] == (owner == f"{match.group(2)} {match.group(1)}")
            elif match := re.fullmatch(r"the (\w+ \w+) is (left of|right of|above|below) the (\w+ \w+)", item["text"]):
                assert item["label"] == _holds(record, *match.groups())
            else:
                pytest.fail(f"unexpected statement {item['text']!r}")


def _holds(record, first, relation, second):
    by_name = {obj["name"]: obj for obj in record["objects"]}
    (ax, ay), (bx, by) = _centre(by_name[first]), _centre(by_name[second])
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def test_relation_captions_are_true(synth_dir):
    seen = 0
    for record in read(synth_dir / "train.jsonl"):
        for text in record["texts"]:
            if match := re.fullmatch(r"an? (\w+ \w+) (left of|right of|above|below) an? (\w+ \w+)", text):
                assert _holds(record, *match.groups())
                seen += 1
    assert seen > 50


def test_holdout_stays_out_of_train_but_not_test(tmp_path):
    held = ["red triangle", "blue star"]
    counts = generate(tmp_path, n=320, seed=1, holdout=held, progress=False)  # 26 single-object test scenes
    assert counts["holdout"] == sorted(held)
    train_text = (tmp_path / "train.jsonl").read_text()
    for name in held:
        assert name not in train_text  # not drawn, not captioned, not even asked about
    test = read(tmp_path / "test.jsonl")
    test_labels = {record.get("label") for record in test}
    assert set(CLASSES) <= test_labels  # every class, held-out ones included, has test images


def test_holdout_validation_and_cli(tmp_path, capsys):
    with pytest.raises(UserError, match="pink star"):
        generate(tmp_path, n=10, holdout=["pink star"], progress=False)
    from vlmkit.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "cli"), "--n", "12", "--seed", "2", "--no-progress",
                 "--holdout", "green circle"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] + summary["test"] == 12 and summary["holdout"] == ["green circle"]
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--n", "1", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "--n" in captured.err


def test_box_relation_follows_the_larger_centre_offset():
    from vlmkit.data.synthetic import box_relation

    a = [0, 0, 10, 10]                                     # centre (5, 5); y grows downwards
    assert box_relation(a, [20, 2, 30, 12]) == "left of"   # dx 20 > dy 2
    assert box_relation([20, 2, 30, 12], a) == "right of"
    assert box_relation(a, [2, 20, 12, 30]) == "above"     # dy 20 > dx 2
    assert box_relation([2, 20, 12, 30], a) == "below"
    assert box_relation(a, [10, 10, 20, 20]) == "left of"  # a tie goes to the horizontal axis
    assert box_relation(a, [4, 0, 14, 10], min_offset=5) is None  # too close to call
    assert box_relation(a, [4, 0, 14, 10]) == "left of"   # without a threshold it always answers
