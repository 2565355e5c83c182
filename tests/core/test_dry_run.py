"""`vlmkit train --dry-run`: counts the model the run would train, estimates per-GPU memory, writes nothing."""
import json
import os

import pytest

from vlmkit.cli import main
from vlmkit.train.recipe import load_recipe, parse_overrides
from vlmkit.train.trainer import Trainer


def _dry_run(capsys, *args):
    assert main(["train", "--dry-run", *args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def _files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_dry_run_counts_the_real_model_and_writes_nothing(synth, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _files(synth)
    overrides = ["lock_image=true", "model.vision.depth=1"]
    result, err = _dry_run(capsys, "--recipe", "clip-vit-tiny", "--data", str(synth / "train.jsonl"), "--gpus", "2",
                           "--out", str(tmp_path / "run"), "fsdp=true", *overrides)
    assert _files(tmp_path) == [] and _files(synth) == before
    # The model a real run builds from the same recipe and data (nothing is written before train()).
    model, _ = Trainer(load_recipe("clip-vit-tiny", parse_overrides(overrides)), str(synth / "train.jsonl"), tmp_path / "real")._prepare()
    model.lock("image")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result["parameters"] == {"total": total, "trainable": trainable} and trainable < total
    memory = result["memory_per_gpu_bytes"]
    assert result["fsdp"] and result["gpus"] == 2 and result["micro_batch_per_gpu"] == 64
    assert memory["parameters"] == 4 * total // 2 and memory["gradients"] == 4 * trainable // 2
    assert memory["optimizer"] == 8 * trainable // 2
    assert memory["activations"] > 0 and memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert f"{total:,} parameters" in err and "activations" in err


def test_estimate_follows_batch_gpus_checkpointing_and_sharding(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, _ = _dry_run(capsys, "--recipe", "virtex-tiny", "precision=bf16", "batch_size=32")
    assert base["transformer_blocks"], "virtex's forward runs on meta tensors: block shapes are measured"
    double, _ = _dry_run(capsys, "--recipe", "virtex-tiny", "precision=bf16", "batch_size=64")
    spread, _ = _dry_run(capsys, "--recipe", "virtex-tiny", "--gpus", "2", "precision=bf16", "batch_size=64")
    sharded, _ = _dry_run(capsys, "--recipe", "virtex-tiny", "--gpus", "2", "precision=bf16", "batch_size=64", "fsdp=true")
    checkpointed, _ = _dry_run(capsys, "--recipe", "virtex-tiny", "precision=bf16", "batch_size=32", "gradient_checkpointing=true")
    fp32, _ = _dry_run(capsys, "--recipe", "virtex-tiny", "precision=fp32", "batch_size=32")
    activations = lambda result: result["memory_per_gpu_bytes"]["activations"]  # noqa: E731
    assert activations(double) == 2 * activations(base) and activations(spread) == activations(base)
    assert activations(fp32) == 2 * activations(base)
    blocks = base["transformer_blocks"]
    kept = sum(b * s * h * 2 for b, s, h in blocks)  # each block's bf16 input, plus one block recomputed at a time
    assert len(blocks) == 2 and blocks[0] == blocks[1]  # two like blocks: the recomputed one costs half of base
    assert activations(checkpointed) == kept + activations(base) // 2 < activations(base)
    assert spread["memory_per_gpu_bytes"]["optimizer"] == base["memory_per_gpu_bytes"]["optimizer"]  # DDP replicates
    assert sharded["memory_per_gpu_bytes"]["optimizer"] == base["memory_per_gpu_bytes"]["optimizer"] // 2
    assert "gathered" in sharded["memory_per_gpu_bytes"] and "gathered" not in spread["memory_per_gpu_bytes"]
    assert os.listdir(tmp_path) == []


def test_the_documented_block_formula():
    """34 s b h bytes per bf16 block with the usual 4h MLP (Korthikanti et al. without attention scores)."""
    from vlmkit.layers.transformer import TransformerBlock
    from vlmkit.train.estimate import _block_activation_bytes

    assert _block_activation_bytes(TransformerBlock(64, 4), (8, 50, 64), 2) == 34 * 8 * 50 * 64
    assert _block_activation_bytes(TransformerBlock(64, 4, context_dim=32), (8, 50, 64), 4) == 2 * 49 * 8 * 50 * 64


@pytest.mark.parametrize("args, message", [
    (["--recipe", "virtex-tiny", "--gpus", "0"], "--gpus must be at least 1"),
    (["--recipe", "virtex-tiny", "--gpus", "3"], "divisible by grad_accum x gpus"),
    (["--recipe", "virtex-tiny", "--resume"], "leave out --resume"),
])
def test_bad_dry_runs_exit_2(args, message, capsys):
    assert main(["train", "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["lm-tiny", "frozen-tiny", "visualgpt-tiny"])
def test_dry_run_of_families_on_the_language_model_needs_no_data(recipe, capsys):
    # bos id from the stand-in vocabulary; frozen-tiny's CLIP vision start is left out too (no run here)
    assert main(["train", "--recipe", recipe, "--dry-run", "init_text=null", "init_image=null"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] > 0


def test_dry_run_sizes_sequences_at_the_longest_training_sample(capsys):
    """The dummy batch is short (LLaVA's: image tokens and a few words); the estimate is for the longest sample a
    run trains on: the LM's context, capped by the family's `training.max_length` (tokens per sample)."""
    result, _ = _dry_run(capsys, "--recipe", "llava-tiny-stage2", "init=null", "training.max_length=100")
    vision, *_, language = result["transformer_blocks"]
    assert language[1] == 100 and vision[1] < 100  # the ViT keeps its own (patch) length
    result, _ = _dry_run(capsys, "--recipe", "lm-tiny", "init_text=null")
    assert {block[1] for block in result["transformer_blocks"]} == {128}  # lm-tiny's context
