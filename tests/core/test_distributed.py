"""torchrun with two CPU processes (gloo) trains exactly like one process with the whole batch.

The ViT recipe: BatchNorm (the ResNet tower) keeps per-process statistics under DDP, as in
every PyTorch DDP run without SyncBatchNorm, so only BatchNorm-free towers match exactly.
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


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun is not installed")
def test_two_gloo_processes_match_one_process(synth, tmp_path):
    args = ["--recipe", "clip-vit-tiny", "--data", str(synth / "train.jsonl"), *FAST, "steps=4", "save_every=4"]
    single = tmp_path / "single"
    assert main(["train", "--out", str(single), *args]) == 0
    double = tmp_path / "double"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "vlmkit", "train", "--out", str(double), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = _rows(single), _rows(double)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        # Same samples, same global contrastive loss; only the float summation order differs.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
