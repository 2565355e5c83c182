"""torchrun with two CPU processes (gloo) trains exactly like one process with the whole batch.

The ViT recipe without its convolutional stem: BatchNorm (the stem, the ResNet tower) keeps
per-process statistics under DDP, as in every PyTorch DDP run without SyncBatchNorm, so only
BatchNorm-free towers match exactly.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from vlmkit.cli import main

from core_helpers import FAST


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")


def _recipe_per_family() -> dict[str, str]:
    """{family: a shipped recipe training one of its tiny configurations}, from the registry."""
    from vlmkit.models.registry import get_family, list_families, list_models, named_config
    from vlmkit.train.recipe import recipe_models

    tiny = set(list_models(tiny=True))
    chosen = {}
    for recipe, model in sorted(recipe_models().items()):
        if model in tiny:
            chosen.setdefault(named_config(model)[0], recipe)
    missing = {family for family in list_families() if get_family(family).trainable} - set(chosen)
    assert not missing, f"families without a recipe training a tiny configuration: {sorted(missing)}"
    return chosen


@needs_torchrun
def test_every_family_trains_two_steps_under_torchrun(synth, tmp_path):
    """Two gloo processes, every family: whatever heads a step leaves without gradients, DDP must not hang or fail."""
    recipes = _recipe_per_family()
    script = os.path.join(os.path.dirname(__file__), "ddp_every_family.py")
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", script, str(synth / "train.jsonl"), str(tmp_path), *recipes.values()],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for family, recipe in recipes.items():
        rows = _rows(tmp_path / recipe)
        assert [row["step"] for row in rows] == [1, 2], family
        assert all(row["loss"] == row["loss"] for row in rows), family  # finite, not NaN


@needs_torchrun
def test_two_gloo_processes_match_one_process(synth, tmp_path):
    args = ["--recipe", "clip-vit-tiny", "--data", str(synth / "train.jsonl"), *FAST, "steps=4", "save_every=4",
            "model.vision.conv_stem=[]"]  # the plain ViT: no BatchNorm
    single = tmp_path / "single"
    assert main(["train", "--out", str(single), *args]) == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "vlmkit", "train", "--out", str(double), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = _rows(single), _rows(double)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        # Same samples, same global contrastive loss; only the float summation order differs.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
