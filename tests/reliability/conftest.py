"""Fixtures of the reliability tests: the generated bad-input corpus and one tiny trained run, each
made once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make_corpus is a script in this folder, importable

from make_corpus import make_corpus  # noqa: E402
from reliability_helpers import TINY  # noqa: E402

from vlmkit.data.synthetic import generate  # noqa: E402


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A few built-in scenes (the good data the corpus files point at)."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, n=24, seed=5, image_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, synth):
    """The bad-input corpus of make_corpus.py, its good image one of the built-in scenes."""
    good = sorted((synth / "images").glob("*.png"))[0]
    return make_corpus(tmp_path_factory.mktemp("corpus"), good_image=good)


@pytest.fixture(scope="session")
def run(tmp_path_factory, synth) -> Path:
    """A tiny CLIP trained for two steps: the --model of every verb the corpus goes through."""
    from vlmkit.cli import main

    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--recipe", "clip-vit-tiny", "--data", str(synth / "train.jsonl"), "--out", str(out),
                 *TINY]) == 0
    return out
