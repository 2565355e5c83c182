"""Image-text retrieval: every caption of every record is a query and a target."""
from __future__ import annotations

from vlmkit.capabilities import EmbedsImages, EmbedsTexts

from typing import Sequence

import torch

from vlmkit.errors import UserError


def evaluate_retrieval(model, records: Sequence[dict]) -> dict:
    """Recall@1/5/10 both ways (fractions), using all captions of each image."""
    from vlmkit.metrics.retrieval import recall_at_k

    model.require(EmbedsImages, task="retrieval")
    model.require(EmbedsTexts, task="retrieval")
    records = [record for record in records if record.get("texts")]
    if not records:
        raise UserError("no record has captions ('text' or 'texts'); retrieval needs image-caption pairs")
    texts = [text for record in records for text in record["texts"]]
    text_to_image = torch.tensor([index for index, record in enumerate(records) for _ in record["texts"]])
    image_embeddings = model.embed_images([record["image"] for record in records])  # (N_img, D)
    text_embeddings = model.embed_texts(texts)  # (N_txt, D)
    scores = image_embeddings @ text_embeddings.T  # (N_img, N_txt)
    return {**recall_at_k(scores, text_to_image), "n_images": len(records), "n_texts": len(texts)}
