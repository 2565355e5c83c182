"""`vlmkit index build` and `vlmkit index search` (the parsers; work happens in build.py / store.py).

Both print one JSON object on stdout; progress goes to stderr. Heavy imports (torch, numpy,
FAISS) stay inside the handlers so building the parser is cheap.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `index` verb with its `build` and `search` sub-verbs."""
    index = subparsers.add_parser("index", help="build a FAISS search index of a dataset, or search one (prints JSON)")
    verbs = index.add_subparsers(dest="index_command", metavar="build|search", required=True)

    build = verbs.add_parser("build", help="embed a dataset's images in resumable chunks and write a FAISS index folder")
    build.add_argument("--model", required=True, help="run folder (or checkpoint) whose embeddings the index holds")
    build.add_argument("--data", required=True, help="records to index (JSONL, CSV, COCO JSON, WebDataset shards)")
    build.add_argument("--out", required=True, help="index folder to write (an interrupted build there resumes)")
    build.add_argument("--ivf", type=int, help="IVF-PQ: number of inverted lists (with --pq); default: exact search")
    build.add_argument("--pq", type=int, help="IVF-PQ: number of sub-quantizers, a divisor of the dimension (with --ivf)")
    build.add_argument("--pq-bits", type=int, default=8, help="IVF-PQ: bits per sub-quantizer code (default 8)")
    build.add_argument("--nprobe", type=int, default=16, help="IVF-PQ: lists a search visits by default (default 16)")
    build.add_argument("--chunk", type=int, help="items per resumable chunk (default 1024)")
    build.add_argument("--rows", choices=("image", "text"), default="image",
                       help="one row per image (default; captions kept in the metadata) or one per caption")
    build.add_argument("--batch-size", type=int, default=64, help="items the model embeds at once (default 64)")
    build.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_printing(_build))

    search = verbs.add_parser("search", help="search an index with a text (or --image) query; prints the hits as JSON")
    search.add_argument("index", help="index folder written by `vlmkit index build`")
    search.add_argument("query", nargs="?", help='text query, e.g. "a red circle"')
    search.add_argument("--image", help="search with this image instead of a text")
    search.add_argument("-k", type=int, default=10, help="number of hits (default 10)")
    search.add_argument("--model", help="model to embed the query with (default: the run the index was built with)")
    search.add_argument("--nprobe", type=int, help="IVF-PQ: lists to visit (more: better recall, slower)")
    search.add_argument("--device", help="torch device (default: cpu)")
    search.set_defaults(func=_printing(_search))


def _printing(handler):
    def run(args: argparse.Namespace) -> int:
        from vlmkit.cli import print_json

        print_json(handler(args))
        return 0

    return run


def _build(args) -> dict:
    from vlmkit.index.build import build_index

    return build_index(args.model, args.data, args.out, ivf=args.ivf, pq=args.pq, pq_bits=args.pq_bits,
                       nprobe=args.nprobe, chunk=args.chunk, rows=args.rows, batch_size=args.batch_size,
                       device=args.device, progress=not args.quiet)


def _search(args) -> dict:
    from vlmkit.index.query import search_index

    return search_index(args.index, text=args.query, image=args.image, k=args.k, model_path=args.model,
                        nprobe=args.nprobe, device=args.device)
