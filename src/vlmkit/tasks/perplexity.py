"""Perplexity of a language model on texts: exp(total next-token NLL / number of predicted tokens).

The model needs the `ScoresText` capability (`text_nll`). Texts come from a `.txt` file (one
per non-empty line) or any records file, read as the model's family reads its training texts.
Texts longer than the model's context are cut by its tokenizer (which keeps the end token); how
many were cut is part of the result, so a number is never computed on silently shortened data.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from vlmkit.capabilities import ScoresText
from vlmkit.errors import UserError


@torch.no_grad()
def evaluate_perplexity(model, texts: Sequence[str], batch_size: int = 64) -> dict:
    """{"perplexity", "tokens" (predicted tokens scored), "texts", "truncated"} of `model` on `texts`."""
    model.require(ScoresText, task="perplexity")
    if model.tokenizer is None:
        raise UserError("this model has no tokenizer attached; load it with vlmkit.load(run_folder)")
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise UserError("no text to score; the data holds no captions, questions, answers or lines of text")
    was_training = model.training
    model.eval()
    total_nll, total_tokens, truncated = 0.0, 0, 0
    limit = model.tokenizer.context_length - 2  # room left by the begin and end tokens
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            truncated += sum(len(model.tokenizer.encode(text, add_special_tokens=False)) > limit for text in chunk)
            nll, count = model.text_nll(chunk)
            total_nll += float(nll.double().sum())
            total_tokens += int(count.sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise UserError("the texts gave no token to predict (each is a single token); perplexity is undefined")
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "texts": len(texts),
            "truncated": truncated}


def read_texts(path: str, model) -> list[str]:
    """The texts of a `.txt` file (one per non-empty line) or of a records file, read as the model's
    family reads its training texts (`tokenizer_texts`: for the `lm` family, captions, questions
    with their answers as one text each, statements), so a test set is scored like training data."""
    from vlmkit.data.formats import read_records

    records = read_records(path, require_text=False, require_image=False)
    return list(type(model).tokenizer_texts(records))
