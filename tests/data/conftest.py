"""Fixtures for the data tests: one small synthetic dataset per session (fast, deterministic)."""
from __future__ import annotations

import pytest

from vlmkit.data.synthetic import generate


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A 240-scene synthetic dataset (192 train / 48 test) generated once for the session."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, n=240, seed=3, image_size=64, progress=False)
    return out
