"""Image-text retrieval: every caption of every record is a query and a target.

Candidates are ranked by the cosine of the models' embeddings (ITC). With `rerank_k` (BLIP's
protocol, train_retrieval.py) the top K candidates of every query are re-scored by the model's
image-text matching head: score = matching logit + cosine; the others stay below them. A model
that only matches (a single-stream fusion encoder: no separate embeddings) scores every
(image, text) pair with its matching head instead, up to `MAX_MATCH_PAIRS` pairs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from vlmkit.capabilities import EmbedsImages, EmbedsTexts, MatchesImageText, provides
from vlmkit.errors import UserError

MAX_MATCH_PAIRS = 250_000  # all-pairs matching: one fusion forward per pair


def evaluate_retrieval(model, records: Sequence[dict], rerank_k: int | None = None, batch_size: int = 64) -> dict:
    """Recall@1/5/10 both ways (fractions), using all captions of each image.

    `rerank_k`: re-rank each query's top K candidates with the model's matching head (a model that
    `MatchesImageText`); the result then also holds the embedding-only figures under "itc".
    """
    from vlmkit.metrics.retrieval import recall_at_k

    if not provides(model, EmbedsImages) and provides(model, MatchesImageText) and rerank_k is None:
        return _matching_retrieval(model, records, batch_size)
    model.require(EmbedsImages, task="retrieval")
    model.require(EmbedsTexts, task="retrieval")
    if rerank_k is not None:
        model.require(MatchesImageText, task="retrieval re-ranking (--rerank-k)")
        if rerank_k < 1:
            raise UserError(f"--rerank-k must be at least 1, got {rerank_k}")
    records = [record for record in records if record.get("texts")]
    if not records:
        raise UserError("no record has captions ('text' or 'texts'); retrieval needs image-caption pairs")
    texts = [text for record in records for text in record["texts"]]
    images = [record["image"] for record in records]
    text_to_image = torch.tensor([index for index, record in enumerate(records) for _ in record["texts"]])
    image_embeddings = model.embed_images(images)  # (N_img, D)
    text_embeddings = model.embed_texts(texts)  # (N_txt, D)
    scores = image_embeddings @ text_embeddings.T  # (N_img, N_txt)
    counts = {"n_images": len(records), "n_texts": len(texts)}
    if rerank_k is None:
        return {**recall_at_k(scores, text_to_image), **counts}
    image_to_text, text_to_image_scores = rerank_with_matching(model, images, texts, scores, rerank_k, batch_size)
    reranked = {key: value for key, value in recall_at_k(image_to_text, text_to_image).items() if key.startswith("i2t")}
    reranked.update({key: value for key, value in recall_at_k(text_to_image_scores, text_to_image).items()
                     if key.startswith("t2i")})
    return {**reranked, "rerank_k": rerank_k, "itc": recall_at_k(scores, text_to_image), **counts}


@torch.no_grad()
def rerank_with_matching(model, images: Sequence, texts: Sequence[str], scores: torch.Tensor, k: int,
                         batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (N_img, N_txt) score matrices, image->text and text->image: each query's top-k candidates by
    `scores` get `match_scores + scores`, every other pair -inf. Image features are computed once."""
    was_training = model.training
    model.eval()
    try:
        device = model.device
        features = torch.cat([model.image_match_features(model.preprocess(images[start : start + batch_size]).to(device))
                              for start in range(0, len(images), batch_size)])  # (N_img, ...)
        tokens = model.tokenize(list(texts)).to(device)  # (N_txt, L)

        def rescored(query_scores: torch.Tensor, image_of_pair, text_of_pair) -> torch.Tensor:
            top = query_scores.topk(min(k, query_scores.shape[1]), dim=1)  # (Q, k) candidates per query
            queries = torch.arange(query_scores.shape[0])[:, None].expand_as(top.indices).reshape(-1)
            candidates = top.indices.reshape(-1)
            image_index, text_index = image_of_pair(queries, candidates), text_of_pair(queries, candidates)
            matched = torch.cat([
                model.match_scores(features[image_index[start : start + batch_size].to(device)],
                                   tokens[text_index[start : start + batch_size].to(device)]).float().cpu()
                for start in range(0, len(queries), batch_size)
            ])  # (Q*k,)
            result = torch.full_like(query_scores, float("-inf"))
            result[queries, candidates] = matched + top.values.reshape(-1)
            return result

        image_to_text = rescored(scores, lambda query, candidate: query, lambda query, candidate: candidate)
        text_to_image = rescored(scores.T, lambda query, candidate: candidate, lambda query, candidate: query).T
    finally:
        model.train(was_training)
    return image_to_text, text_to_image


@torch.no_grad()
def _matching_retrieval(model, records: Sequence[dict], batch_size: int) -> dict:
    """Recall@K of a model that only matches: every (image, text) pair scored by `match_scores`."""
    from vlmkit.metrics.retrieval import recall_at_k

    records = [record for record in records if record.get("texts")]
    if not records:
        raise UserError("no record has captions ('text' or 'texts'); retrieval needs image-caption pairs")
    texts = [text for record in records for text in record["texts"]]
    pairs = len(records) * len(texts)
    if pairs > MAX_MATCH_PAIRS:
        raise UserError(f"the '{model.family}' family has no separate embeddings, so retrieval scores every (image, text) "
                        f"pair with its matching head: {len(records)} images x {len(texts)} texts = {pairs} pairs is over "
                        f"{MAX_MATCH_PAIRS}; evaluate on fewer records")
    text_to_image = torch.tensor([index for index, record in enumerate(records) for _ in record["texts"]])
    was_training = model.training
    model.eval()
    try:
        device = model.device
        tokens = model.tokenize(texts).to(device)  # (N_txt, L)
        scores = torch.empty(len(records), len(texts))
        for start in range(0, len(records), batch_size):
            features = model.image_match_features(model.preprocess([r["image"] for r in records[start:start + batch_size]]).to(device))
            for row, feature in enumerate(features):
                for first in range(0, len(texts), batch_size * 4):
                    chunk = tokens[first:first + batch_size * 4]
                    expanded = feature[None].expand(len(chunk), *feature.shape)
                    scores[start + row, first:first + len(chunk)] = model.match_scores(expanded, chunk).float().cpu()
    finally:
        model.train(was_training)
    return {**recall_at_k(scores, text_to_image), "n_images": len(records), "n_texts": len(texts), "scoring": "matching head"}
