"""Issue #18, "values that crash or are silently accepted": every recipe and model-config value is
checked for type and range before anything is written, and a bad one is one line, exit code 2 and
no run folder left behind."""
from __future__ import annotations

import json

import pytest
import yaml

from vlmkit.cli import main

from train_helpers import logged, make_data, one_line_error, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("recipes-data"))


@pytest.mark.parametrize("override,needle", [
    # each was a traceback after the run folder was written
    ("steps=abc", "steps must be an integer, got 'abc'"),
    ("hflip=abc", "hflip must be a number, got 'abc'"),
    ("caption=xyz", "caption must be one of random, first, pairs, got 'xyz'"),
    ("save_every=0", "save_every must be at least 1, got 0"),
    ("log_every=0", "log_every must be at least 1, got 0"),
    ("grad_accum=0", "grad_accum must be at least 1, got 0"),
    ("threads=-1", "threads must be at least 0, got -1"),
    ("num_workers=-1", "num_workers must be at least 0, got -1"),
    # each was silently accepted
    ("steps=0", "steps must be at least 1, got 0"),
    ("steps=-1", "steps must be at least 1, got -1"),
    ("batch_size=0", "batch_size must be at least 1, got 0"),
    ("batch_size=-4", "batch_size must be at least 1, got -4"),
    ("precision=fp8", "precision must be one of auto, fp32, bf16, got 'fp8'"),
    ("warmup_steps=-5", "warmup_steps must be at least 0, got -5"),
    ("steps=true", "steps must be an integer, got True"),
    ("lr=inf", "lr must be a finite number"),
    ("lr=.nan", "lr must be a finite number"),
    ("model_overrides=5", "model_overrides must be a mapping"),
    ("training=[1]", "training must be a mapping"),
    # model configuration values
    ("model.embed_dim=abc", "embed_dim must be an integer, got 'abc'"),
    ("model.text.width=-5", "text.width must be at least 1, got -5"),
    ("model.text.heads=3", "text.width 32 is not divisible by text.heads 3"),
    ("model.vision=[1,2]", "vision must be a mapping of VisionConfig keys, got [1, 2]"),
    ("model.text=null", "text must be a mapping of TextConfig keys, got None"),
    ("model.vision.mlp_ratio=.inf", "vision.mlp_ratio must be a finite number"),
    ("model.vision.width=64.5", "vision.width must be an integer, got 64.5"),
    ("model.vision.conv_stem=[abc]", "vision.conv_stem must be a list of integers, got ['abc']"),
    ("crop_scale=[1]", "crop_scale must be a list of 2 numbers, got [1]"),
    ("model.text.dropout=1", "text.dropout must be in [0, 1), got 1.0"),
])
def test_a_bad_value_is_one_line_and_leaves_no_run_folder(override, needle, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, data, "steps=2", override) == 2
    error = one_line_error(capsys)
    assert needle in error, error
    assert not run.exists()


def test_the_readme_example_lr_1e_3_trains(data, tmp_path):
    # YAML 1.1 reads `1e-3` as the string "1e-3"; the field is a float, so it is read as one.
    run = tmp_path / "run"
    assert train(run, data, "lr=1e-3", "steps=1") == 0
    assert json.loads((run / "recipe.json").read_text())["lr"] == 0.001
    assert [row["step"] for row in logged(run)] == [1]


def test_a_recipe_file_with_bad_sections_is_one_line(data, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    for text, needle in [({"model": "clip-tiny", "model_overrides": {"vision": [1, 2]}}, "vision must be a mapping"),
                         ({"model": "clip-tiny", "model_overrides": 7}, "model_overrides must be a mapping"),
                         ({"model": "clip-tiny", "lr": "1e-3x"}, "lr must be a number, got '1e-3x'")]:
        recipe.write_text(yaml.safe_dump(text))
        run = tmp_path / "run"
        assert main(["train", "--recipe", str(recipe), "--data", str(data), "--out", str(run), "steps=1"]) == 2
        assert needle in one_line_error(capsys)
        assert not run.exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda config: config.update(embed_dim="abc"), "config.json config.embed_dim must be an integer, got 'abc'"),
    (lambda config: config["text"].update(width=-5), "text.width must be at least 1, got -5"),
    (lambda config: config["text"].update(heads=3), "text.width 32 is not divisible by text.heads 3"),
    (lambda config: config.update(vision=[1, 2]), "vision must be a mapping of VisionConfig keys"),
])
def test_a_model_folder_with_a_bad_config_is_one_line(edit, needle, trained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(trained, folder)
    meta = json.loads((folder / "config.json").read_text())
    edit(meta["config"])
    (folder / "config.json").write_text(json.dumps(meta))
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "a red circle"}) + "\n")
    assert main(["embed", "--model", str(folder), "--data", str(texts), "--out", str(tmp_path / "e.safetensors")]) == 2
    error = one_line_error(capsys)
    assert needle in error and str(folder / "config.json") in error, error
    assert not (tmp_path / "e.safetensors").exists()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("recipes-trained") / "run"
    assert train(run, data, "steps=1") == 0
    return run


def test_resume_refuses_a_model_override_and_a_tokenizer_change(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "metrics.jsonl").read_bytes()
    for override in ("model.vision.width=64", "model.text.heads=4", "tokenizer=clip", "vocab_size=2048"):
        assert train(run, None, "steps=3", override, resume=True) == 2
        key = override.split("=")[0]
        assert f"{key} cannot change now" in one_line_error(capsys)
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing was touched
    # The same value as the run was built with is no change, and a bad recipe value is still refused.
    assert train(run, None, "steps=3", "save_every=0", resume=True) == 2
    assert "save_every must be at least 1" in one_line_error(capsys)
    assert train(run, None, "steps=2", "model.vision.width=32", resume=True) == 0


def test_a_recipe_built_in_code_is_checked_as_one_read_from_a_file():
    # The ranges and choices are declared on the Recipe's fields, so both ways share one check.
    from vlmkit.errors import UserError
    from vlmkit.train.recipe import Recipe

    for options, needle in [({"steps": 0}, "recipe key steps must be at least 1, got 0"),
                            ({"precision": "fp8"}, "recipe key precision must be one of auto, fp32, bf16, got 'fp8'"),
                            ({"beta2": 1.0}, "recipe key beta2 must be in [0, 1), got 1.0"),
                            ({"lr": 0.0}, "recipe key lr must be above 0, got 0.0")]:
        with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            Recipe(**options)
    assert Recipe(grad_clip=None).grad_clip is None  # an optional value left unset is not range-checked
