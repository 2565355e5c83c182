"""Evaluation and everyday commands print one JSON object with the documented keys."""
import json

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.cli import main

from core_helpers import FAST


@pytest.fixture(scope="module")
def run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--recipe", "clip-vit-tiny", "--data", str(synth / "train.jsonl"), "--out", str(out), "steps=3", *FAST]) == 0
    return out


def _json(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # exactly one JSON object on stdout
    return json.loads(lines[0])


def test_eval_zeroshot(run, synth, capsys):
    assert main(["eval", "zeroshot", "--model", str(run), "--data", str(synth / "test.jsonl")]) == 0
    result = _json(capsys)
    assert {"top1", "top5", "mean_per_class_recall", "n"} <= set(result)
    assert 0 <= result["top1"] <= 1 and result["n"] > 0


def test_eval_zeroshot_with_templates_file(run, synth, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\none {} on a plain background\n")
    assert main(["eval", "zeroshot", "--model", str(run), "--data", str(synth / "test.jsonl"), "--templates", str(templates)]) == 0
    assert "top1" in _json(capsys)
    templates.write_text("no placeholder here\n")
    assert main(["eval", "zeroshot", "--model", str(run), "--data", str(synth / "test.jsonl"), "--templates", str(templates)]) == 2


def test_eval_retrieval(run, synth, capsys):
    assert main(["eval", "retrieval", "--model", str(run), "--data", str(synth / "test.jsonl")]) == 0
    result = _json(capsys)
    assert set(result) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "n_images", "n_texts"}
    assert result["n_texts"] > result["n_images"] == 10
    assert result["i2t_r1"] <= result["i2t_r5"] <= result["i2t_r10"]


def test_eval_linear_probe(run, synth, capsys):
    assert main(["eval", "linear-probe", "--model", str(run), "--train", str(synth / "train.jsonl"), "--test", str(synth / "train.jsonl")]) == 0
    result = _json(capsys)
    assert 0 <= result["top1"] <= 1 and result["n_train"] == result["n_test"]


def test_classify_and_embed(run, synth, tmp_path, capsys):
    records = [json.loads(line) for line in (synth / "test.jsonl").read_text().splitlines()]
    image = str(synth / records[0]["image"])
    assert main(["classify", image, "--model", str(run), "--labels", "red circle", "blue square", "green star"]) == 0
    result = _json(capsys)
    top = result["predictions"][0]["top"]
    assert len(top) == 3 and abs(sum(item["probability"] for item in top) - 1) < 1e-3
    out = tmp_path / "feats.safetensors"
    assert main(["embed", "--model", str(run), "--data", str(synth / "test.jsonl"), "--out", str(out)]) == 0
    _json(capsys)
    tensors = load_file(out)
    assert tensors["image_embeddings"].shape[0] == 10
    assert torch.allclose(tensors["text_embeddings"].norm(dim=-1), torch.ones(len(tensors["text_embeddings"])), atol=1e-5)


def test_classify_missing_image_is_a_clear_error(run, capsys):
    assert main(["classify", "/no/such.png", "--model", str(run), "--labels", "a", "b"]) == 2
    assert "/no/such.png" in capsys.readouterr().err


def test_eval_hard_negatives(run, synth, capsys):
    import random

    from vlmkit.data.negatives import hard_negative

    assert main(["eval", "hard-negatives", "--model", str(run), "--data", str(synth / "test.jsonl")]) == 0
    result = _json(capsys)
    assert set(result) == {"accuracy", "per_kind", "pairs", "n_images"} and set(result["per_kind"]) <= {"spatial", "swap"}
    records = [json.loads(line) for line in (synth / "test.jsonl").read_text().splitlines()]
    swaps = sum(hard_negative(text, random.Random(), ("swap",)) is not None for r in records for text in r["texts"])
    assert result["pairs"]["swap"] == swaps > 0 and all(0 <= v <= 1 for v in result["per_kind"].values())
    assert main(["eval", "hard-negatives", "--model", str(run), "--data", str(synth / "test.jsonl")]) == 0
    assert _json(capsys) == result  # the negatives are seeded
    assert main(["eval", "hard-negatives", "--model", str(run), "--data", str(synth / "test.jsonl"), "--kinds", "verbs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "verbs" in err
