import pytest

from vlmkit.data.synthetic import generate

# A tiny model so trainer tests take seconds: one block per tower.
FAST = ["model.vision.depth=1", "model.text.depth=1", "model.vision.width=64", "model.text.width=64",
        "model.embed_dim=32", "batch_size=8", "warmup_steps=2", "log_every=1"]


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small built-in dataset (40 train / 10 test scenes), generated once per session."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, n=50, seed=3)
    return out
