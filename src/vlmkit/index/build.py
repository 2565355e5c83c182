"""`vlmkit index build`: embed a dataset in resumable chunks and write a FAISS index folder.

Rows: by default one row per image (its vector from the model's EmbedsImages capability) and the
record, captions included, as that row's metadata: a text query then finds images, which is what
a search page shows. With `rows="text"` every caption is a row of its own (EmbedsTexts; the record
gets the row's caption as "text"), for text-to-text search or for text-only models.

Resumable: the items to embed are cut into chunks of `chunk` items; each chunk's vectors are
written atomically to `OUT/chunks/NNNNN.safetensors` as soon as they are computed, and a build
that finds a chunk file already there reuses it. `OUT/build.json`, written before the first
chunk, records which model and which data the chunks come from, so resuming with another model
or other data is refused instead of mixing vectors. The FAISS index, the metadata and, last,
`index.json` are written once every chunk exists. Unreadable images are skipped and counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from vlmkit.errors import UserError
from vlmkit.index.store import (CHUNKS_DIR, DEFAULT_NPROBE, FAISS_FILE, FORMAT_VERSION, INFO_FILE, METADATA_FILE,
                                import_faiss)

BUILD_FILE = "build.json"
DEFAULT_CHUNK = 1024
ROW_KINDS = ("image", "text")
# Weight files a model folder's fingerprint covers (with config.json): what decides the vectors.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLE_BLOCKS, _BLOCK = 64, 1 << 16


def file_fingerprint(path: Path, digest) -> None:
    """Feed `path`'s size and 64 evenly spaced 64 KiB blocks into `digest` (whole file when small).

    Sampling keeps a 14 GB checkpoint's fingerprint as cheap as a tiny one's, and any retraining
    changes every block, so two different weight files practically never share it."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as file:
        if size <= _SAMPLE_BLOCKS * _BLOCK:
            digest.update(file.read())
            return
        for block in range(_SAMPLE_BLOCKS):
            file.seek(block * (size - _BLOCK) // (_SAMPLE_BLOCKS - 1))
            digest.update(file.read(_BLOCK))


def model_fingerprint(path: str | os.PathLike) -> str:
    """A short hash of what a model path holds (config.json and weight files), independent of where it lies."""
    source = Path(path)
    digest = hashlib.sha256()
    if source.is_file():
        file_fingerprint(source, digest)
    elif source.is_dir():
        for item in sorted(source.iterdir()):
            if item.is_file() and (item.name == "config.json" or item.suffix in _WEIGHT_SUFFIXES):
                file_fingerprint(item, digest)
    else:
        raise UserError(f"model path {source} does not exist; give the run folder the index should embed with")
    return digest.hexdigest()[:16]


def data_fingerprint(records: list[dict]) -> str:
    """A short hash of the records as read (image references resolved, captions normalised)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _items(records: list[dict], rows: str) -> tuple[list[int], list[Any]]:
    """(record index, what to embed) per future row: each record's image, or each of its captions."""
    owners, payloads = [], []
    for position, record in enumerate(records):
        if rows == "image":
            if record.get("image"):
                owners.append(position)
                payloads.append(record["image"])
        else:
            for text in record.get("texts", []):
                owners.append(position)
                payloads.append(text)
    return owners, payloads


def _prepare_folder(out: Path, identity: dict[str, Any], chunk: int | None) -> int:
    """Check `out` can hold this build (new, empty, or an earlier build of the same model and data)
    and return the chunk size to use; writes build.json and removes a stale index.json."""
    from vlmkit.io import atomic_write_json

    build_file = out / BUILD_FILE
    if build_file.exists():
        try:
            earlier = json.loads(build_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{build_file} is damaged; delete the folder {out} and build again") from None
        for key, what in (("model_fingerprint", "model"), ("data_fingerprint", "data"), ("rows", "row kind")):
            if earlier.get(key) != identity[key]:
                raise UserError(
                    f"index folder {out} was built with another {what} ({earlier.get(key.split('_')[0], earlier.get(key))}); "
                    f"choose a new --out or delete {out} to rebuild it")
        if chunk is not None and chunk != earlier.get("chunk"):
            raise UserError(f"index folder {out} was started with --chunk {earlier.get('chunk')}; resume with that "
                            f"--chunk (or leave it out), or delete {out} to rebuild with {chunk}")
        chunk = int(earlier["chunk"])
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an index folder; choose a new --out (or an empty folder)")
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise UserError(f"--chunk must be at least 1 (got {chunk})")
    (out / INFO_FILE).unlink(missing_ok=True)  # the folder is incomplete again until this build ends
    atomic_write_json(build_file, {**identity, "chunk": chunk})
    return chunk


def _read_chunk(path: Path, expected_items: int):
    """A chunk file's (vectors, rows, skipped) when it is whole and of the expected size, else None."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception:  # a damaged or foreign file: embed the chunk again
        return None
    if {"vectors", "rows", "skipped"} - set(tensors) or len(tensors["rows"]) + len(tensors["skipped"]) != expected_items:
        return None
    return tensors["vectors"], tensors["rows"], tensors["skipped"]


def _embed_chunk(model, payloads: list[Any], first: int, rows: str, batch_size: int, bar):
    """Embed one chunk's items; returns (vectors (n, D), item numbers (n,), skipped item numbers, notes)."""
    import torch

    from vlmkit.data.formats import CorruptImage, load_image

    vectors, kept, skipped, notes = [], [], [], []
    for start in range(0, len(payloads), batch_size):
        batch = payloads[start : start + batch_size]
        numbers = range(first + start, first + start + len(batch))
        if rows == "image":
            inputs = []
            for number, ref in zip(numbers, batch):
                try:
                    inputs.append(load_image(ref))
                    kept.append(number)
                except CorruptImage as error:
                    skipped.append(number)
                    notes.append(str(error))
            if inputs:
                vectors.append(model.embed_images(inputs, batch_size=len(inputs)))
        else:
            kept.extend(numbers)
            vectors.append(model.embed_texts(batch, batch_size=len(batch)))
        bar.update(len(batch))
    dim = vectors[0].shape[1] if vectors else 0
    return (torch.cat(vectors) if vectors else torch.zeros(0, dim), torch.tensor(kept, dtype=torch.int64),
            torch.tensor(skipped, dtype=torch.int64), notes)


def _faiss_index_needs(count: int, ivf: int, pq_bits: int) -> None:
    """The error for too few vectors to train IVF-PQ (k-means needs at least as many points as centroids)."""
    raise UserError(f"IVF-PQ with --ivf {ivf} and {pq_bits}-bit codes needs at least {max(ivf, 2 ** pq_bits)} vectors "
                    f"to train and the data gives {count}; use a smaller --ivf / --pq-bits or the exact index (no --ivf/--pq)")


def _faiss_index(vectors, ivf: int | None, pq: int | None, pq_bits: int):
    """An exact inner-product index, or IVF-PQ (trained on the vectors) when `ivf` and `pq` are given."""
    faiss = import_faiss()
    count, dim = vectors.shape
    if ivf is None:
        index = faiss.IndexFlatIP(dim)
    else:
        if dim % pq:
            raise UserError(f"--pq {pq} must divide the vector dimension {dim}; pick a divisor of {dim}")
        if count < max(ivf, 2 ** pq_bits):
            _faiss_index_needs(count, ivf, pq_bits)
        index = faiss.index_factory(dim, f"IVF{ivf},PQ{pq}x{pq_bits}", faiss.METRIC_INNER_PRODUCT)
        # index_factory turns on polysemous training, which only Hamming pre-filtering (unused here)
        # needs and which is 20x the rest of the training time.
        faiss.downcast_index(index).do_polysemous_training = False
        index.train(vectors)
    index.add(vectors)
    return index


def build_index(model_path: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                ivf: int | None = None, pq: int | None = None, pq_bits: int = 8, nprobe: int = DEFAULT_NPROBE,
                chunk: int | None = None, rows: str = "image", batch_size: int = 64, device: str | None = None,
                progress: bool = True, after_chunk: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Embed `data`'s images (or captions, `rows="text"`) with the model at `model_path` and write index folder `out`.

    Exact search (IndexFlatIP on L2-normalised vectors) unless `ivf` (inverted lists) and `pq`
    (sub-quantizers of `pq_bits` bits) ask for IVF-PQ; `nprobe` is stored as the lists a search
    visits by default. Work is done in chunks of `chunk` items (default 1024, or the size an
    interrupted build of the same folder started with) that a re-run reuses; `after_chunk(number)`
    is called after each chunk is written (tests interrupt there). Returns a summary: rows,
    skipped images, dimension, kind, chunks embedded and reused.
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    import vlmkit
    from vlmkit.capabilities import EmbedsImages, EmbedsTexts, require
    from vlmkit.data.formats import read_records
    from vlmkit.io import atomic_write_bytes, atomic_write_json, save_safetensors

    faiss = import_faiss()  # fail before any embedding when FAISS is missing
    if rows not in ROW_KINDS:
        raise UserError(f"--rows must be one of {', '.join(ROW_KINDS)} (got '{rows}')")
    if (ivf is None) != (pq is None):
        raise UserError("IVF-PQ needs both --ivf N (inverted lists) and --pq M (sub-quantizers); give both, or neither for the exact index")
    for name, value, low in (("--ivf", ivf, 1), ("--pq", pq, 1), ("--pq-bits", pq_bits, 1), ("--nprobe", nprobe, 1),
                             ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            raise UserError(f"{name} must be at least {low} (got {value})")
    if pq_bits > 16:
        raise UserError(f"--pq-bits must be at most 16 (got {pq_bits}); 8 is the usual choice")
    out = Path(out)
    records = read_records(data, require_text=rows == "text")
    model_fp = model_fingerprint(model_path)  # also: a clear error for a missing model path
    owners, payloads = _items(records, rows)
    if not payloads:
        raise UserError(f"dataset '{data}' has no {'images' if rows == 'image' else 'captions'} to index")
    if ivf is not None and len(payloads) < max(ivf, 2 ** pq_bits):  # known before embedding: fail before it
        _faiss_index_needs(len(payloads), ivf, pq_bits)
    identity = {"format": FORMAT_VERSION, "model": str(Path(model_path).resolve()), "model_fingerprint": model_fp,
                "data": str(Path(data).resolve()), "data_fingerprint": data_fingerprint(records), "rows": rows,
                "items": len(payloads)}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = vlmkit.load(model_path, device=device)
    require(model, EmbedsImages if rows == "image" else EmbedsTexts, task=f"index build (--rows {rows})")
    chunk = _prepare_folder(out, identity, chunk)

    chunk_dir = out / CHUNKS_DIR
    spans = [(start, min(start + chunk, len(payloads))) for start in range(0, len(payloads), chunk)]
    found = {number: _read_chunk(chunk_dir / f"{number:05d}.safetensors", end - start)
             for number, (start, end) in enumerate(spans) if (chunk_dir / f"{number:05d}.safetensors").exists()}
    found = {number: tensors for number, tensors in found.items() if tensors is not None}
    done = sum(spans[number][1] - spans[number][0] for number in found)
    bar = tqdm(total=len(payloads), initial=done, desc="index", unit=rows, file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    parts, notes, embedded = [], [], 0
    try:
        for number, (start, end) in enumerate(spans):
            if number in found:
                parts.append(found[number])
                continue
            vectors, kept, skipped, chunk_notes = _embed_chunk(model, payloads[start:end], start, rows, batch_size, bar)
            save_safetensors({"vectors": vectors.float(), "rows": kept, "skipped": skipped},
                             chunk_dir / f"{number:05d}.safetensors", metadata={"chunk": str(number)})
            parts.append((vectors, kept, skipped))
            notes += chunk_notes
            embedded += 1
            if after_chunk is not None:
                after_chunk(number)
    finally:
        bar.close()
    for note in notes[:5]:
        print(f"vlmkit: skipped: {note}", file=sys.stderr)
    if len(notes) > 5:
        print(f"vlmkit: skipped {len(notes) - 5} more unreadable images", file=sys.stderr)

    vectors = torch.cat([part[0] for part in parts if len(part[0])] or [torch.zeros(0, 0)]).numpy().astype(np.float32)
    kept = torch.cat([part[1] for part in parts]).tolist()
    skipped = sum(len(part[2]) for part in parts)
    if not kept:
        raise UserError(f"none of the {len(payloads)} images of '{data}' could be read; fix the image paths in the dataset")
    vectors = np.ascontiguousarray(vectors)
    faiss.normalize_L2(vectors)  # already unit length from embed_*; again so reused chunks are too
    index = _faiss_index(vectors, ivf, pq, pq_bits)

    lines = []
    for number in kept:
        record = records[owners[number]]
        lines.append(json.dumps(record if rows == "image" else {**record, "text": payloads[number]}, default=str))
    atomic_write_bytes(out / METADATA_FILE, ("\n".join(lines) + "\n").encode())
    atomic_write_bytes(out / FAISS_FILE, faiss.serialize_index(index).tobytes())
    info = {**identity, "family": getattr(model, "family", type(model).__name__), "dim": int(vectors.shape[1]),
            "kind": "flat" if ivf is None else "ivfpq", "count": len(kept), "skipped": skipped, "chunk": chunk,
            **({"ivf": ivf, "pq": pq, "pq_bits": pq_bits, "nprobe": nprobe} if ivf is not None else {})}
    atomic_write_json(out / INFO_FILE, info)  # last: its presence means the folder is complete
    return {"out": str(out), "count": len(kept), "skipped": skipped, "dim": info["dim"], "kind": info["kind"],
            "chunks": len(spans), "chunks_embedded": embedded, "chunks_reused": len(spans) - embedded}
