"""Shared settings of the reliability tests (a uniquely named module: every test folder has a conftest.py)."""

# A tiny ViT CLIP that trains in a few seconds on 2 CPU cores.
TINY = ["model.vision.depth=1", "model.text.depth=1", "model.vision.width=32", "model.text.width=32",
        "model.vision.heads=2", "model.text.heads=2", "model.embed_dim=16", "batch_size=8", "warmup_steps=1",
        "log_every=1", "steps=2", "save_every=2"]
