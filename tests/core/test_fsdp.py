"""FSDP (recipe key `fsdp: true`): two gloo processes train exactly like one process, save the same
checkpoint format, and resume exactly; gradient checkpointing, a locked tower and bf16 included."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vlmkit.cli import main
from vlmkit.io import load_safetensors

from core_helpers import FAST

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
# Gradient checkpointing and a frozen tower in every run: FSDP must work with both. The plain ViT
# (no conv stem): BatchNorm keeps per-process statistics, so only BatchNorm-free towers match one
# process exactly (fsdp_runs.py trains the stem once, in bf16). grad_clip: a norm to compare. Adam's
# eps 1e-6: the key biases' gradients are zero up to rounding (softmax ignores a shift of every score),
# and with the recipe's 1e-8 Adam turns that rounding noise into full-size steps of either sign.
ARGS = [*FAST, "steps=4", "save_every=2", "gradient_checkpointing=true", "lock_image=true", "grad_clip=1.0",
        "eps=1e-6", "model.vision.conv_stem=[]"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")
def test_fsdp_two_processes_match_one_and_resume_exactly(synth, tmp_path):
    data = str(synth / "train.jsonl")
    single = tmp_path / "single"
    assert main(["train", "--recipe", "clip-vit-tiny", "--data", data, "--out", str(single), *ARGS]) == 0
    script = os.path.join(os.path.dirname(__file__), "fsdp_runs.py")
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", script, data, str(tmp_path), *ARGS],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    one, first, resumed = _rows(single), _rows(tmp_path / "fsdp-first"), _rows(tmp_path / "fsdp")
    assert [row["step"] for row in first] == [row["step"] for row in resumed] == [1, 2, 3, 4], (first, resumed)
    for a, b in zip(one, first):
        # Same samples, same global contrastive loss; only the float summation order differs.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for a, b in zip(first, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)

    # The checkpoint is the one-process format: same keys, whole tensors, same values.
    reference = load_safetensors(single / "model.safetensors")
    for run in ("fsdp-first", "fsdp"):
        saved = load_safetensors(tmp_path / run / "model.safetensors")
        assert set(saved) == set(reference)
        for key, value in reference.items():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=f"{run} {key}")
    state = torch.load(tmp_path / "fsdp" / "checkpoints" / "step-0000004" / "state.pt", weights_only=True)
    reference_state = torch.load(single / "checkpoints" / "step-0000004" / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"] == reference_state["optimizer"]["param_groups"]
    assert state["optimizer"]["state"].keys() == reference_state["optimizer"]["state"].keys()
    for index, entry in reference_state["optimizer"]["state"].items():
        assert entry.keys() == state["optimizer"]["state"][index].keys()
        for key, value in entry.items():
            torch.testing.assert_close(state["optimizer"]["state"][index][key], value, rtol=1e-3, atol=1e-7)

    bf16 = _rows(tmp_path / "fsdp-bf16")
    assert [row["step"] for row in bf16] == [1, 2] and all(row["loss"] == row["loss"] for row in bf16)
    assert bf16[0]["loss"] == pytest.approx(one[0]["loss"], rel=2e-2)  # bf16 parameters: close, not equal
    assert set(load_safetensors(tmp_path / "fsdp-bf16" / "model.safetensors")) == set(reference)
    stem = _rows(tmp_path / "fsdp-bf16-stem")  # BatchNorm under bf16 FSDP: its own fp32 unit
    assert [row["step"] for row in stem] == [1] and stem[0]["loss"] == stem[0]["loss"]
    assert any(".stem." in key for key in load_safetensors(tmp_path / "fsdp-bf16-stem" / "model.safetensors"))
