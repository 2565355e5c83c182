"""Image-text retrieval recall@K (CLIP_benchmark protocol), as a pure function of a score matrix."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vlmkit.errors import UserError


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, without importing torch
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)


def recall_at_k(scores, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@K both ways for an (n_images, n_texts) similarity matrix (torch or numpy).

    `text_to_image[t]` is the index of caption t's image (several captions per image allowed).
    Image->text is a hit at K when ANY of the image's captions is among its top K texts;
    text->image is a hit when the caption's own image is among its top K images. Returns
    {"i2t_r{K}", "t2i_r{K}"} as fractions in [0, 1]. Ties count in the item's favour only when
    its score is strictly higher than the K-th other score, i.e. rank = number of strictly better
    candidates, as a stable argsort would give for distinct scores.
    """
    matrix = _as_numpy(scores).astype(np.float64)
    owner = _as_numpy(text_to_image).astype(np.int64).reshape(-1)
    if matrix.ndim != 2 or matrix.shape[1] != len(owner):
        raise UserError(f"scores must be (n_images, n_texts) with n_texts = len(text_to_image) = {len(owner)}, "
                        f"got shape {tuple(matrix.shape)}")
    n_images = matrix.shape[0]
    if len(owner) and (owner.min() < 0 or owner.max() >= n_images):
        raise UserError("text_to_image holds an image index outside [0, n_images); fix the caption-to-image map")
    # text -> image: rank of the true image = number of images scoring strictly higher
    true_score = matrix[owner, np.arange(len(owner))]                      # (T,)
    t2i_rank = (matrix > true_score[None, :]).sum(axis=0)                  # (T,)
    # image -> text: best rank among the image's captions
    order = np.argsort(-matrix, axis=1, kind="stable")                     # (I, T)
    ranked_owner = owner[order]                                            # (I, T)
    is_own = ranked_owner == np.arange(n_images)[:, None]
    has_caption = is_own.any(axis=1)
    i2t_rank = np.where(has_caption, is_own.argmax(axis=1), np.iinfo(np.int64).max)
    result = {}
    for k in ks:
        result[f"i2t_r{k}"] = float((i2t_rank < k).mean()) if n_images else float("nan")
    for k in ks:
        result[f"t2i_r{k}"] = float((t2i_rank < k).mean()) if len(owner) else float("nan")
    return result
