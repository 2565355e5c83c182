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


@needs_java
def test_score_captions_runs_meteor_beside_the_other_metrics(reference_numbers, monkeypatch):
    """`score_captions` starts METEOR's JVM on a second thread while it computes the other
    metrics: the same METEOR as the scorer on its own, every other metric unchanged, the JVM
    closed afterwards, and a METEOR error (here: no Java) still reaches the caller."""
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (test extra) provides meteor-1.5.jar")
    from vlmkit.metrics.caption import score_captions

    raw = reference_numbers["input_raw"]
    predictions = {k: v[0]["caption"] for k, v in raw["res"].items()}
    references = {k: [c["caption"] for c in v] for k, v in raw["gts"].items()}
    started = []
    original = meteor_module.Meteor.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(meteor_module.Meteor, "__init__", recording_init)
    with_meteor = score_captions(predictions, references, metrics=("bleu", "rouge", "cider", "meteor"))
    without = score_captions(predictions, references)
    assert abs(with_meteor["METEOR"] - reference_numbers["METEOR"]["corpus"]) <= 1e-9
    assert {k: v for k, v in with_meteor.items() if k != "METEOR"} == without
    assert len(started) == 1 and started[0]._process.poll() is not None

    monkeypatch.setattr(meteor_module.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="METEOR needs Java"):
        score_captions(predictions, references, metrics=("bleu", "meteor"))
