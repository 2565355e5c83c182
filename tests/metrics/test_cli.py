"""`vlmkit score captions|vqa` end to end: COCO and JSONL formats, JSON output, errors -> exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", "score", *args], capture_output=True, text=True, env=env)


@pytest.fixture()
def coco_files(tmp_path, reference_numbers):
    raw = reference_numbers["input_raw"]
    pred = tmp_path / "pred.json"
    refs = tmp_path / "refs.json"
    pred.write_text(json.dumps([{"image_id": int(k), "caption": v[0]["caption"]} for k, v in raw["res"].items()]))
    refs.write_text(json.dumps({"annotations": [{"image_id": int(k), "caption": c["caption"]}
                                                for k, v in raw["gts"].items() for c in v]}))
    return pred, refs


def test_score_captions_coco_format(coco_files, reference_numbers, tmp_path):
    pred, refs = coco_files
    per_image = tmp_path / "per_image.json"
    done = _run("captions", "--pred", str(pred), "--refs", str(refs), "--per-image", str(per_image))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert list(result) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "n"]
    assert abs(result["CIDEr"] - reference_numbers["CIDEr"]["corpus"]) <= 1e-9
    assert len(json.loads(per_image.read_text())) == 3


def test_score_captions_jsonl_records(tmp_path, reference_numbers):
    raw = reference_numbers["input_raw"]
    pred = tmp_path / "pred.jsonl"
    refs = tmp_path / "refs.jsonl"
    pred.write_text("\n".join(json.dumps({"image": f"{k}.jpg", "text": v[0]["caption"]}) for k, v in raw["res"].items()))
    refs.write_text("\n".join(json.dumps({"image": f"{k}.jpg", "texts": [c["caption"] for c in v]})
                              for k, v in raw["gts"].items()))
    done = _run("captions", "--pred", str(pred), "--refs", str(refs), "--metrics", "bleu")
    assert done.returncode == 0, done.stderr
    assert abs(json.loads(done.stdout)["BLEU-4"] - reference_numbers["Bleu"]["corpus"][3]) <= 1e-9


def test_errors_are_one_line_and_exit_2(coco_files, tmp_path):
    pred, refs = coco_files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"caption": "no id"}]))
    done = _run("captions", "--pred", str(bad), "--refs", str(refs))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "entry 1" in done.stderr
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(json.loads(pred.read_text()) + [{"image_id": 99, "caption": "x"}]))
    done = _run("captions", "--pred", str(extra), "--refs", str(refs))
    assert done.returncode == 2 and "image 99 has a prediction but no references" in done.stderr
    done = _run("captions", "--pred", str(tmp_path / "missing.json"), "--refs", str(refs))
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_score_vqa(tmp_path):
    pred = tmp_path / "pred.json"
    refs = tmp_path / "refs.json"
    pred.write_text(json.dumps([{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "2"}]))
    refs.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no", "question_type": "is"},
        {"question_id": 2, "answers": [{"answer": "2"}] * 10, "answer_type": "number", "question_type": "how many"},
    ]}))
    official = json.loads(_run("vqa", "--pred", str(pred), "--refs", str(refs)).stdout)
    lavis = json.loads(_run("vqa", "--pred", str(pred), "--refs", str(refs), "--variant", "lavis").stdout)
    assert official["accuracy"] == 0.5 and lavis["accuracy"] == 1.0
    assert official["per_answer_type"] == {"number": 1.0, "yes/no": 0.0}
