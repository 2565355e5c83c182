"""Searching an index folder with a text or an image: what `vlmkit index search` runs.

The query is embedded with the model the index was built with (or `model_path`, which must hold
the same weights: vectors of another model live in another space), L2-normalised, and passed to
`SearchIndex.search`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlmkit.errors import UserError


def embed_query(model, text: str | None = None, image: Any = None):
    """(1, D) float32 L2-normalised numpy embedding of one text or one image (a path or PIL image)."""
    from vlmkit.capabilities import EmbedsImages, EmbedsTexts, require

    if (text is None) == (image is None):
        raise UserError('give either a text query or --image PATH, e.g. vlmkit index search IDX "a red circle"')
    if text is not None:
        if not text.strip():
            raise UserError("the text query is empty; give a few words, e.g. \"a red circle\"")
        require(model, EmbedsTexts, task="index search with a text")
        return model.embed_texts([text]).numpy()
    from vlmkit.data.formats import load_image

    require(model, EmbedsImages, task="index search with an image")
    return model.embed_images([load_image(image) if isinstance(image, (str, os.PathLike)) else image]).numpy()


def search_index(index_path: str | os.PathLike, text: str | None = None, image: Any = None, k: int = 10,
                 model_path: str | os.PathLike | None = None, nprobe: int | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """Search index folder `index_path` with `text` or `image`; {"index", "query", "k", "hits"}."""
    import vlmkit
    from vlmkit.index.build import model_fingerprint
    from vlmkit.index.store import SearchIndex

    if k < 1:
        raise UserError(f"-k must be at least 1 (got {k})")
    index = SearchIndex.load(index_path, nprobe=nprobe)
    model_path = model_path or index.info["model"]
    if not Path(model_path).exists():
        raise UserError(f"the index's model {model_path} does not exist any more; pass the run it was built with as --model")
    if model_fingerprint(model_path) != index.info.get("model_fingerprint"):
        raise UserError(f"model {model_path} is not the one index '{index_path}' was built with ({index.info['model']}); "
                        f"pass that run as --model, or build an index with this model")
    query = embed_query(vlmkit.load(model_path, device=device), text=text, image=image)
    return {"index": str(index_path), "query": text if text is not None else str(image), "k": k,
            "hits": index.search(query, k)[0]}
