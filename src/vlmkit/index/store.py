"""A built index folder on disk, loaded for search: `SearchIndex`.

An index folder holds `index.json` (what was built: the model, the data, the vector dimension, the
FAISS kind, the row count), `index.faiss` (the vectors), `metadata.jsonl` (row i's record on line
i) and `chunks/` (the embeddings the build computed, kept so a build can resume and so the FAISS
index can be rebuilt with other settings without embedding again). `index.json` is written last,
so a folder that has it is complete.

Vectors are L2-normalised, so the inner product the FAISS index computes is the cosine
similarity; queries must be normalised the same way (the server and the CLI do it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmkit.errors import UserError

INFO_FILE = "index.json"
FAISS_FILE = "index.faiss"
METADATA_FILE = "metadata.jsonl"
CHUNKS_DIR = "chunks"
FORMAT_VERSION = 1
# nprobe when index.json does not say: visit this many inverted lists (or all, when there are fewer).
DEFAULT_NPROBE = 16


def import_faiss():
    """The `faiss` module, or a UserError saying how to install it (it is the `index` extra)."""
    try:
        import faiss
    except ImportError:
        raise UserError("the search index needs FAISS, which is not installed; run `pip install vlmkit[index]` "
                        "(or `pip install faiss-cpu`)") from None
    return faiss


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The `index.json` of index folder `path`, or a UserError saying what the folder lacks."""
    folder = Path(path)
    info_file = folder / INFO_FILE
    if not folder.is_dir():
        raise UserError(f"index '{folder}' does not exist; build one with `vlmkit index build --model RUN --data X.jsonl --out {folder}`")
    if not info_file.exists():
        raise UserError(f"'{folder}' is not a complete index (no {INFO_FILE}); finish it with `vlmkit index build` "
                        f"(an interrupted build resumes) or point at an index folder")
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{info_file} is not valid JSON ({error}); rebuild the index with `vlmkit index build`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise UserError(f"{info_file} is not a vlmkit index description of format {FORMAT_VERSION}; rebuild the index")
    return info


class SearchIndex:
    """A FAISS index with the records its rows stand for, loaded from a folder `vlmkit index build` wrote.

    `search(queries, k)` takes (Q, D) float32 L2-normalised queries and returns, per query, up to
    `k` hits `{"row", "score", "record"}` best first (score: the inner product, i.e. the cosine
    similarity, approximate for IVF-PQ). `dim` is D, `count` the number of rows, `kind` "flat" or
    "ivfpq", `model_info` the build's description (its "model" key is the run the vectors came
    from: embed queries with that model).
    """

    def __init__(self, faiss_index, records: list[dict], info: dict[str, Any], path: Path) -> None:
        self._index = faiss_index
        self.records = records
        self.info = info
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, nprobe: int | None = None) -> "SearchIndex":
        """Load index folder `path`; `nprobe` (IVF-PQ only) overrides how many lists a search visits."""
        faiss = import_faiss()
        import numpy as np

        folder = Path(path)
        info = read_info(folder)
        try:
            data = np.fromfile(folder / FAISS_FILE, dtype=np.uint8)
            faiss_index = faiss.deserialize_index(data)
        except (OSError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot read {folder / FAISS_FILE} ({reason}); rebuild the index with `vlmkit index build`") from None
        records = []
        try:
            with open(folder / METADATA_FILE, encoding="utf-8") as file:
                records = [json.loads(line) for line in file if line.strip()]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read {folder / METADATA_FILE} ({error}); rebuild the index with `vlmkit index build`") from None
        if len(records) != faiss_index.ntotal or faiss_index.ntotal != info.get("count") or faiss_index.d != info.get("dim"):
            raise UserError(f"index '{folder}' is inconsistent ({faiss_index.ntotal} vectors, {len(records)} records, "
                            f"index.json says {info.get('count')} of dimension {info.get('dim')}); rebuild it with `vlmkit index build`")
        index = cls(faiss_index, records, info, folder)
        index.set_nprobe(nprobe if nprobe is not None else info.get("nprobe"))
        return index

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def model_info(self) -> dict[str, Any]:
        """What the vectors are: {"model": run path, "fingerprint", "family", "rows": "image" | "text", ...}."""
        return {key: self.info[key] for key in ("model", "model_fingerprint", "family", "rows", "dim", "kind", "count")
                if key in self.info}

    def set_nprobe(self, nprobe: int | None) -> None:
        """How many inverted lists an IVF-PQ search visits (more: better recall, slower); the flat index ignores it."""
        if self.kind != "ivfpq":
            return
        faiss = import_faiss()
        ivf = faiss.extract_index_ivf(self._index)
        nprobe = DEFAULT_NPROBE if nprobe is None else int(nprobe)
        if nprobe < 1:
            raise UserError(f"--nprobe must be at least 1 (got {nprobe})")
        ivf.nprobe = min(nprobe, ivf.nlist)

    def record(self, row: int) -> dict:
        """The record row `row` stands for (UserError when there is no such row)."""
        if not isinstance(row, int) or not 0 <= row < len(self.records):
            raise UserError(f"index '{self.path.name}' has no row {row}; rows go from 0 to {len(self.records) - 1}")
        return self.records[row]

    def search(self, queries, k: int = 10) -> list[list[dict]]:
        """Up to `k` hits per query row of `queries` ((Q, D) float32, L2-normalised), best first."""
        import numpy as np

        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UserError(f"queries of shape {tuple(queries.shape)} do not fit index '{self.path.name}', which holds "
                            f"{self.dim}-dimensional vectors; embed them with the index's model ({self.info.get('model')})")
        if not isinstance(k, int) or k < 1:
            raise UserError(f"k must be a positive whole number (got {k!r})")
        if len(queries) == 0 or self.count == 0:
            return [[] for _ in range(len(queries))]
        scores, rows = self._index.search(queries, min(k, self.count))
        return [
            [{"row": int(row), "score": float(score), "record": self.records[row]}
             for score, row in zip(score_row, row_row) if row >= 0]  # -1: IVF found fewer than k
            for score_row, row_row in zip(scores, rows)
        ]
