"""Short real training runs on the built-in data, with fixed seeds and margins over baselines.

The longer runs behind the README figures use the recipes as they are; these use a small
dataset and few steps so the folder stays within a few minutes on two shared CPU cores.
"""
import pytest

import vlmkit
from vlmkit.cli import main
from vlmkit.data.formats import read_records
from vlmkit.tasks.generative import (evaluate_caption, evaluate_caption_baseline, evaluate_reasoning, evaluate_vqa,
                                     evaluate_vqa_baseline)

pytestmark = pytest.mark.slow


def _train(recipe, data, out, *overrides):
    assert main(["train", "--recipe", recipe, "--data", str(data / "train.jsonl"), "--out", str(out),
                 "log_every=50", "warmup_steps=20", "threads=1", *overrides]) == 0  # the thresholds were set on 1-thread runs
    return vlmkit.load(out)


@pytest.fixture(scope="module")
def vqa_run(synth_data, tmp_path_factory):
    return _train("vqa-tiny", synth_data, tmp_path_factory.mktemp("vqa-run"), "steps=1500", "save_every=1500")


def test_vqa_classifier_beats_the_majority_answer(vqa_run, synth_data):
    train, test = read_records(synth_data / "train.jsonl"), read_records(synth_data / "test.jsonl")
    model = evaluate_vqa(vqa_run, test)
    majority = evaluate_vqa_baseline(train, test)
    print("vqa", model, "majority", majority)
    assert model["n"] == majority["n"] > 1000
    # Measured (seed 0, 1500 steps, 800 training scenes): overall 0.590 vs 0.366, count 0.66 vs 0.37,
    # colour 0.58 vs 0.17, yes/no 0.82 vs 0.50, relation 0.608 vs 0.504 (339 questions: true or
    # mirrored at random, so above 0.5 only once grounding and the offset readout work). Shape
    # questions need the full data (README: 0.327 vs 0.241); on these 800 scenes they stay at 0.23.
    types = model["per_question_type"]
    assert model["accuracy"] > majority["accuracy"] + 0.1
    for kind, margin in (("count", 0.15), ("color", 0.2), ("yesno", 0.15), ("relation", 0.05)):
        assert types[kind] > majority["per_question_type"][kind] + margin, kind


def test_reasoning_head_beats_chance(vqa_run, synth_data):
    result = evaluate_reasoning(vqa_run, read_records(synth_data / "test.jsonl"))
    print("reasoning", result)
    # True and false statements are balanced: chance is 0.5. Measured (seed 0, 1500 steps): 0.810 on 1412.
    assert result["n"] > 1000 and result["accuracy"] > 0.7


def test_captioner_beats_the_nearest_neighbour_caption(synth_data, tmp_path):
    train, test = read_records(synth_data / "train.jsonl"), read_records(synth_data / "test.jsonl")
    model = _train("virtex-tiny", synth_data, tmp_path / "virtex", "steps=150", "save_every=150")
    captions = evaluate_caption(model, test)
    baseline = evaluate_caption_baseline(train, test)
    print("captions", captions, "nearest neighbour", baseline)
    assert captions["n"] == baseline["n"] == len(test)
    assert captions["CIDEr"] > baseline["CIDEr"] + 0.1
