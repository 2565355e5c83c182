"""Caption metrics as papers report them: pycocoevalcap's BLEU-1..4, ROUGE-L, CIDEr-D, METEOR.

`score_captions` validates the input, PTB-tokenizes predictions and references in the order
pycocoevalcap's COCOEvalCap does (image by image, in prediction order: the order matters, see
`vlmkit.metrics.ptb`), then runs the scorers. BLEU, ROUGE-L and CIDEr-D are pure numpy and
equal pycocoevalcap's to 1e-9 or better; METEOR runs the jar shipped with pycocoevalcap.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate, chain, repeat
from typing import Hashable, Iterable, Mapping, Sequence

from vlmkit.errors import UserError
from vlmkit.metrics import ngrams
from vlmkit.metrics.bleu import bleu_scores
from vlmkit.metrics.cider import cider_scores
from vlmkit.metrics.ngrams import count_caption_ngrams, encode_both
from vlmkit.metrics.ptb import tokenize
from vlmkit.metrics.rouge import rouge_l_scores

METRICS = ("bleu", "rouge", "cider", "meteor", "spice")
DEFAULT_METRICS = ("bleu", "rouge", "cider")
_PLAIN_SEQUENCES = (list, tuple)


def _plainly_valid(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> bool:
    """True when the input is well-formed in the usual way: the same image ids on both sides,
    non-blank `str` captions, references in non-empty lists or tuples. All checks are C-level
    passes (set comparisons of the key views, `map` over the values); `validate_captions`
    accepts everything this accepts, and anything else goes through its full checks."""
    if not (predictions and predictions.keys() <= references.keys() and references.keys() <= predictions.keys()):
        return False
    captions = predictions.values()
    if not set(map(type, captions)) <= _STR or not all(map(str.strip, captions)):
        return False
    groups = references.values()
    if not set(map(type, groups)) <= _PLAIN_SEQUENCE_TYPES or not all(groups):
        return False
    flat = list(chain.from_iterable(groups))
    return set(map(type, flat)) <= _STR and all(map(str.strip, flat))


_STR = {str}
_PLAIN_SEQUENCE_TYPES = set(_PLAIN_SEQUENCES)


def validate_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    """Raise UserError naming the first malformed entry; nothing is ever dropped silently."""
    if _plainly_valid(predictions, references):
        return
    if not predictions:
        raise UserError("there are no predictions to score; pass at least one {image_id: caption}")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str) or not caption.strip():
            raise UserError(f"the prediction for image {image_id!r} is empty or not a string; "
                            f"give every image a non-empty caption")
        if image_id not in references:
            raise UserError(f"image {image_id!r} has a prediction but no references; "
                            f"check that predictions and references use the same image ids")
    for image_id, refs in references.items():
        # Fast path for the usual case (a list or tuple of non-blank str): two C-level passes
        # instead of an ABC isinstance and a Python-level check per caption. Anything it does
        # not accept goes through the full checks below, which name the problem.
        if (image_id in predictions and type(refs) in _PLAIN_SEQUENCES and refs
                and all(map(isinstance, refs, repeat(str))) and all(map(str.strip, refs))):
            continue
        if image_id not in predictions:
            raise UserError(f"image {image_id!r} has references but no prediction; "
                            f"predict every reference image or remove it from the references")
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise UserError(f"the references of image {image_id!r} must be a non-empty list of captions")
        for caption in refs:
            if not isinstance(caption, str) or not caption.strip():
                raise UserError(f"image {image_id!r} has an empty or non-string reference caption; "
                                f"remove it or fill it in")


def _check_metrics(metrics: Iterable[str]) -> list[str]:
    chosen = [m.strip().lower() for m in metrics if m.strip()]
    for metric in chosen:
        if metric not in METRICS:
            raise UserError(f"unknown caption metric '{metric}'; choose from {', '.join(METRICS[:4])}")
    if "spice" in chosen:
        raise UserError("SPICE is not available: it needs Java 8, the spice-1.0.jar and a Stanford CoreNLP "
                        "3.6.0 model download at run time (pycocoevalcap's get_stanford_models), which "
                        "vlmkit does not fetch; leave 'spice' out of --metrics")
    if not chosen:
        raise UserError("no caption metric chosen; use e.g. --metrics bleu,rouge,cider")
    return chosen


def _meteor_scores(hypotheses: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    from vlmkit.metrics.meteor import Meteor

    with Meteor() as meteor:
        return meteor.compute_score(hypotheses, references)


def score_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                   metrics: Iterable[str] = DEFAULT_METRICS, per_image: bool = False) -> dict:
    """Corpus caption scores: keys "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr", "METEOR" (as asked), "n".

    `predictions` maps an image id to one caption, `references` maps the same ids to lists of
    captions (raw text; tokenization is done here). With `per_image=True` the result also holds
    "per_image": {image_id: {metric: score}}. Scores are fractions (CIDEr around 0-10), exactly
    pycocoevalcap's.

    Nothing outside the call changes: the garbage collector, the allocator, the environment
    and the running threads are as the caller left them (the worker threads of a call are
    joined before it returns).
    """
    chosen = _check_metrics(metrics)
    validate_captions(predictions, references)
    image_ids = list(predictions)
    segments: dict = {}  # both tokenizations meet the same words: scan each once
    hypotheses = tokenize(list(map(predictions.__getitem__, image_ids)), segments)
    reference_lists = list(map(references.__getitem__, image_ids))
    flat = tokenize(list(chain.from_iterable(reference_lists)), segments)
    # each image's slice of `flat` (C-level passes instead of a loop over images)
    stops = list(accumulate(map(len, reference_lists)))
    grouped = list(map(flat.__getitem__, map(slice, [0] + stops[:-1], stops)))

    result: dict = {}
    per: dict[str, list[float]] = {}
    with ThreadPoolExecutor(max_workers=2) as background:
        # METEOR is a Java process, which the thread only waits for
        meteor = background.submit(_meteor_scores, hypotheses, grouped) if "meteor" in chosen else None
        # BLEU and CIDEr-D share one n-gram count of the whole set
        # ...and all scorers one encoding of the words into integers
        by_space, by_whitespace = encode_both(hypotheses + flat)
        # ROUGE-L is numpy work on large arrays (which releases the GIL), like the counting: with
        # a second core the two run side by side
        rouge = None
        if "rouge" in chosen and ngrams.CORES > 1:
            rouge = background.submit(rouge_l_scores, hypotheses, grouped, encoded=by_space)
        counts = (count_caption_ngrams(hypotheses, grouped, encoded=by_whitespace)
                  if {"bleu", "cider"} & set(chosen) else None)
        if "bleu" in chosen:
            corpus, scores = bleu_scores(hypotheses, grouped, counts=counts)
            for k in range(4):
                result[f"BLEU-{k + 1}"] = corpus[k]
                per[f"BLEU-{k + 1}"] = scores[k]
        if "rouge" in chosen:
            result["ROUGE-L"], per["ROUGE-L"] = (rouge.result() if rouge is not None
                                                 else rouge_l_scores(hypotheses, grouped, encoded=by_space))
        if "cider" in chosen:
            result["CIDEr"], per["CIDEr"] = cider_scores(hypotheses, grouped, counts=counts)
        if meteor is not None:
            result["METEOR"], per["METEOR"] = meteor.result()
    result["n"] = len(image_ids)
    if per_image:
        result["per_image"] = {image_id: {name: values[index] for name, values in per.items()}
                               for index, image_id in enumerate(image_ids)}
    return result
