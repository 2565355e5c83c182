"""Fixtures for the metric tests: the live pycocoevalcap reference (skipped when absent)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

# The reference numbers of ../shared/reference/pycocoevalcap.json (3 images x 3 refs, from
# pycocoevalcap 1.2), kept in the repo so the tests never depend on a folder beside the checkout.
REFERENCE_JSON = os.path.join(os.path.dirname(__file__), "data", "pycocoevalcap_reference.json")


def _pycocoevalcap_dir():
    try:
        import pycocoevalcap
    except ImportError:
        return None
    return list(pycocoevalcap.__path__)[0]


@pytest.fixture(scope="session")
def reference_numbers():
    path = os.path.abspath(REFERENCE_JSON)
    if not os.path.isfile(path):
        pytest.skip(f"reference numbers not found at {path}")
    with open(path) as handle:
        return json.load(handle)


@pytest.fixture(scope="session")
def coco_scorers():
    """pycocoevalcap's Bleu, Rouge, Cider classes (live reference)."""
    pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pycocoevalcap (test extra) is not installed")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    return Bleu, Rouge, Cider


@pytest.fixture(scope="session")
def java_ptb():
    """A function running the real Java PTBTokenizer pipeline of pycocoevalcap on a list of captions.

    All captions go through one JVM call, in order, exactly as pycocoevalcap's PTBTokenizer
    writes them (one per line), and the same punctuation tokens are dropped.
    """
    folder = _pycocoevalcap_dir()
    if folder is None:
        pytest.skip("pycocoevalcap (test extra) is not installed")
    if shutil.which("java") is None:
        pytest.skip("Java is not installed; the PTB parity test needs the real Java tokenizer")
    jar = os.path.join(folder, "tokenizer", "stanford-corenlp-3.4.1.jar")
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    def run(captions: list[str]) -> list[str]:
        with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as handle:
            handle.write("\n".join(c.replace("\n", " ") for c in captions).encode())
        try:
            output = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                                     "-preserveLines", "-lowerCase", handle.name],
                                    capture_output=True, check=True).stdout.decode()
        finally:
            os.remove(handle.name)
        lines = output.split("\n")
        return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
                for line in lines[:len(captions)]]

    return run
