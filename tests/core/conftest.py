import pytest

from vlmkit.data.synthetic import generate


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small built-in dataset (40 train / 10 test scenes), generated once per session."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, n=50, seed=3, progress=False)
    return out
