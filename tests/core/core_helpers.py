"""Shared settings of the core tests (a uniquely named module: every test folder has a conftest.py).

Trainer tests use the ViT recipe, where these overrides shrink both towers.."""

# A tiny model so trainer tests take seconds: one block per tower.
FAST = ["model.vision.depth=1", "model.text.depth=1", "model.vision.width=64", "model.text.width=64",
        "model.embed_dim=32", "batch_size=8", "warmup_steps=2", "log_every=1"]
