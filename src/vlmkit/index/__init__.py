"""The FAISS search index: `vlmkit index build` writes an index folder, `SearchIndex` searches it.

    from vlmkit.index import SearchIndex
    index = SearchIndex.load("idx")                 # index.json, index.faiss, metadata.jsonl
    hits = index.search(queries, k=10)              # (Q, D) float32 L2-normalised -> Q lists of
                                                    # {"row", "score", "record"}, best first
    index.dim, index.count, index.model_info["model"]

FAISS is the `index` extra (`pip install vlmkit[index]`); this package imports it only when an
index is built or loaded, and the core never imports this package.
"""
from vlmkit.index.store import SearchIndex

__all__ = ["SearchIndex", "build_index"]


def build_index(*args, **kwargs):
    """Embed a dataset and write an index folder; see `vlmkit.index.build.build_index`."""
    from vlmkit.index.build import build_index as _build

    return _build(*args, **kwargs)
