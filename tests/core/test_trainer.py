"""The training loop: exact resume, atomic checkpoints, skipped samples, strict recipes."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.data.formats import read_records
from vlmkit.train.recipe import list_recipes

from core_helpers import FAST


def _train(run, data, *extra, resume=False):
    args = ["train", "--out", str(run)]
    if not resume:
        args += ["--recipe", "clip-vit-tiny", "--data", str(data)]
    else:
        args += ["--resume"]
    return main(args + FAST + list(extra))


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(synth, tmp_path):
    data = synth / "train.jsonl"
    whole = tmp_path / "whole"
    assert _train(whole, data, "steps=12", "save_every=6", "keep_checkpoints=5") == 0
    # Recreate the state of a run that died right after its step-6 checkpoint.
    broken = tmp_path / "broken"
    shutil.copytree(whole, broken)
    shutil.rmtree(broken / "checkpoints" / "step-0000012")
    (broken / "checkpoints" / "latest").write_text("step-0000006")
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join(lines[:8]) + "\n")  # two lines past the checkpoint
    assert _train(broken, data, resume=True) == 0
    assert len(_losses(whole)) == 12
    assert _losses(broken) == _losses(whole)  # bit-identical, step by step
    a, b = vlmkit.load(whole), vlmkit.load(broken)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_run_folder_loads_with_tokenizer_and_transform(synth, tmp_path):
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _train(run, synth / "train.jsonl", "steps=2", "threads=1") == 0
        assert torch.get_num_threads() == 2  # a recipe's threads hold for its run only, not for the caller
    finally:
        torch.set_num_threads(threads)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "metrics.jsonl", "loss_curve.png"):
        assert (run / name).exists(), name
    model = vlmkit.load(run)
    records = read_records(synth / "test.jsonl")[:3]
    images = model.embed_images([record["image"] for record in records])
    texts = model.embed_texts(["a red circle", "a blue square"])
    assert images.shape == (3, 32) and texts.shape == (2, 32)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model.tokenize(["a red circle"]).shape == (1, model.config.text.context_length)
    assert model.transform(records[0]["image"]).shape == (3, 64, 64)


def test_corrupt_and_missing_images_are_skipped_and_counted(synth, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    (data / records[0]["image"]).write_bytes(b"not a png")
    (data / records[1]["image"]).unlink()
    # 40 records, 8 per step, 5 steps = exactly one epoch: each bad sample is seen once.
    assert _train(tmp_path / "run", data / "train.jsonl", "steps=5") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == 2
    assert len(records) == 40


def test_unknown_recipe_key_exits_2_with_one_line_and_writes_nothing(synth, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "vlmkit", "train", "--recipe", "clip-vit-tiny", "--data", str(synth / "train.jsonl"),
         "--out", str(run), "stepz=3"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "stepz" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run.exists()


@pytest.mark.parametrize("args,needle", [
    (["train", "--recipe", "nope", "--data", "x.jsonl", "--out", "r"], "unknown recipe"),
    (["train", "--recipe", "clip-vit-tiny", "--data", "/no/such.jsonl", "--out", "r"], "/no/such.jsonl"),
    (["eval", "zeroshot", "--model", "/no/such/run", "--data", "x.jsonl"], "/no/such/run"),
    (["train", "--out", "/no/such/run", "--resume"], "--resume"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, needle, tmp_path, capsys):
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert needle in error and "\n" not in error


def test_training_twice_into_the_same_folder_needs_resume(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, synth / "train.jsonl", "steps=1") == 0
    assert _train(run, synth / "train.jsonl", "steps=1") == 2
    assert "--resume" in capsys.readouterr().err


def test_checkpoints_are_complete_and_pruned(synth, tmp_path):
    run = tmp_path / "run"
    assert _train(run, synth / "train.jsonl", "steps=6", "save_every=2", "keep_checkpoints=2") == 0
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-0000004", "step-0000006"]
    for name in kept:
        assert {p.name for p in (run / "checkpoints" / name).iterdir()} == {"model.safetensors", "state.pt"}
    assert not list(run.rglob("*.tmp"))


RECIPES = list_recipes()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_two_steps_and_loads(recipe, synth, tmp_path):
    from vlmkit.models.registry import list_models
    from vlmkit.train.recipe import recipe_models

    if recipe_models()[recipe] not in list_models(tiny=True):
        pytest.skip(f"{recipe} is a full-size recipe (its memory estimate is tested with --dry-run)")
    run = tmp_path / recipe
    args = ["train", "--recipe", recipe, "--data", str(synth / "train.jsonl"), "--out", str(run),
            "steps=2", "batch_size=8", "warmup_steps=1", "save_every=2",
            # From scratch: the runs a recipe starts from (init, init_text, init_image) are a user's.
            "init=null", "init_text=null", "init_image=null"]
    assert main(args) == 0
    losses = _losses(run)
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # finite, not NaN
    assert vlmkit.load(run).tokenizer is not None


@pytest.mark.parametrize("override,needle", [
    ("lr=abc", "lr must be a number, got 'abc'"),
    ("steps=abc", "steps must be an integer"),
    ("steps=0", "steps must be at least 1"),
    ("batch_size=-4", "batch_size must be at least 1"),
    ("precision=fp8", "precision must be one of"),
    ("hflip=abc", "hflip must be a number"),
    ("lock_text=maybe", "lock_text must be true or false"),
    ("model.vision.patch_size=7", "not a multiple of vision.patch_size"),
    ("model.text.heads=3", "not divisible by text.heads"),
    ("training.label_smoothing=abc", "label_smoothing must be a number"),
    ("training.nope=1", "unknown key(s) 'nope'"),
])
def test_recipe_values_are_checked_before_anything_is_written(override, needle, synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, synth / "train.jsonl", override) == 2
    error = capsys.readouterr().err.strip()
    assert needle in error and "\n" not in error, error
    assert not run.exists()


def test_numbers_written_as_yaml_strings_are_read_as_numbers(synth, tmp_path):
    # YAML 1.1 reads `1e-3` as a string; the recipe field is a float, so it is taken as one.
    run = tmp_path / "run"
    assert _train(run, synth / "train.jsonl", "lr=1e-3", "steps=1") == 0
    assert json.loads((run / "recipe.json").read_text())["lr"] == 0.001


def test_a_lock_the_family_cannot_honour_is_an_error(synth, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--recipe", "virtex-tiny", "--data", str(synth / "train.jsonl"), "--out", str(run), "lock_text=true", "steps=1"]
    assert main(args) == 2
    assert "'virtex' family has no separate text tower" in capsys.readouterr().err
    assert not run.exists()


def test_resume_refuses_to_change_the_model(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, synth / "train.jsonl", "steps=1") == 0
    assert main(["train", "--out", str(run), "--resume", "steps=2", "model.vision.width=32"]) == 2
    assert "model.vision.width cannot change" in capsys.readouterr().err


def test_a_resnet_tower_rejects_vit_fields():
    with pytest.raises(vlmkit.UserError, match="'patch_size' in clip config.vision do\\(es\\) not apply to a 'resnet' vision tower"):
        vlmkit.create_model("clip-rn-tiny", **{"vision.patch_size": 16})


def test_a_second_run_on_a_locked_folder_fails_at_once(synth, tmp_path, capsys):
    from vlmkit.train.trainer import RunLock

    run = tmp_path / "run"
    lock = RunLock(run)  # as a running `vlmkit train` holds it
    try:
        assert _train(run, synth / "train.jsonl", "steps=1") == 2
        assert "is being trained by vlmkit train (pid" in capsys.readouterr().err
        assert not (run / "metrics.jsonl").exists()
    finally:
        lock.release()
    assert _train(run, synth / "train.jsonl", "steps=1") == 0  # released (or its process died): free again


def test_rerunning_a_crashed_run_starts_a_fresh_log_and_cleans_leftovers(synth, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # a killed attempt, no checkpoint
    (run / ".model.safetensors.abc.tmp").write_bytes(b"half")
    (run / "checkpoints" / ".step-0000002.tmp").mkdir(parents=True)
    assert _train(run, synth / "train.jsonl", "steps=2", "save_every=2") == 0
    assert [row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert not list(run.rglob("*.tmp"))


def test_resume_survives_a_half_written_log_line_and_refuses_a_damaged_state(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, synth / "train.jsonl", "steps=2", "save_every=1", "keep_checkpoints=3") == 0
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "lo')
    (run / "checkpoints" / "latest").write_text("step-0000001")
    assert _train(run, synth / "train.jsonl", resume=True) == 0
    assert [row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    (run / "checkpoints" / "step-0000002" / "state.pt").write_bytes(b"\x80\x04truncated")
    assert _train(run, synth / "train.jsonl", resume=True) == 2
    assert "cannot resume from" in capsys.readouterr().err


def test_the_latest_pointer_must_stay_inside_the_run(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, synth / "train.jsonl", "steps=1") == 0
    (run / "checkpoints" / "latest").write_text("../../other/checkpoints/step-0000001")
    assert _train(run, synth / "train.jsonl", resume=True) == 2
    assert "not a checkpoint of this run" in capsys.readouterr().err


def test_a_run_whose_every_image_is_unreadable_fails_and_saves_nothing(synth, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": f"/no/such/{i}.png", "text": "a red circle"}) + "\n" for i in range(16)))
    run = tmp_path / "run"
    assert _train(run, data, "steps=2") == 2
    assert "no sample of the first" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_atomically_written_files_keep_the_umask(tmp_path):
    import os

    from vlmkit.io import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
