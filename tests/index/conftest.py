"""Fixtures of the index tests: a small built-in dataset and a tiny, untrained CLIP saved as a run folder.

An untrained model is enough: the tests check that the index returns what brute force over the
same model's embeddings returns, not that the embeddings are good."""
import pytest

from vlmkit.data.synthetic import generate

from index_helpers import save_tiny_clip


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """The built-in dataset, small (about 48 train / 12 test scenes), generated once per session."""
    out = tmp_path_factory.mktemp("index-synth")
    generate(out, n=60, seed=3, image_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("index-model") / "clip")
