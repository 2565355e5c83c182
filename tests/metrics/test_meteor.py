"""METEOR through pycocoevalcap's jar: reference numbers, process lifetime, clear errors."""
from __future__ import annotations

import shutil

import pytest

from vlmkit.errors import UserError
from vlmkit.metrics import meteor as meteor_module

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")


@needs_java
def test_reference_meteor_and_process_is_closed(reference_numbers):
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (test extra) provides meteor-1.5.jar")
    gts = reference_numbers["tokenized"]["gts"]
    res = reference_numbers["tokenized"]["res"]
    keys = list(res)
    with meteor_module.Meteor() as scorer:
        corpus, per = scorer.compute_score([res[k][0] for k in keys], [gts[k] for k in keys])
        process = scorer._process
        # the same JVM serves a second call
        again, _ = scorer.compute_score([res[k][0] for k in keys], [gts[k] for k in keys])
    assert abs(corpus - reference_numbers["METEOR"]["corpus"]) <= 1e-9
    assert again == corpus
    for ours, expected in zip(per, reference_numbers["METEOR"]["per_image"]):
        assert abs(ours - expected) <= 1e-9
    assert process.poll() is not None  # closed by the with block


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(meteor_module.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="METEOR needs Java"):
        meteor_module.Meteor()


def test_missing_jar_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(meteor_module.os.path, "isfile", lambda path: False)
    with pytest.raises(UserError, match="meteor-1.5.jar"):
        meteor_module.find_meteor_jar()
