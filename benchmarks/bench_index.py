"""IVF-PQ against the exact index, side by side: recall@10 and queries/s on >= 100k vectors.

The vectors are random and clustered (the shape of real embedding collections: many tight groups
of near-duplicates and paraphrases), L2-normalised as `vlmkit index build` writes them, and the
indexes are built by the same function the build uses (`vlmkit.index.build._faiss_index`), so
this measures what `vlmkit index build --ivf N --pq M` gives. The queries are fresh draws from the
same clusters (not vectors of the collection). Exact and IVF-PQ searches are timed in alternating
rounds in one process, on the same number of threads, so machine noise hits both; read the ratio.
Prints one JSON line per measurement.

    .venv/bin/python benchmarks/bench_index.py [--n 100000] [--dim 128] [--ivf 1024] [--pq 16 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import faiss
import numpy as np

from vlmkit.index.build import _faiss_index


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int, spread: float) -> np.ndarray:
    """`count` unit vectors scattered around randomly chosen `centres` (rows of unit length)."""
    points = centres[rng.integers(0, len(centres), count)]
    points = points + spread * rng.normal(size=points.shape).astype(np.float32) / np.sqrt(centres.shape[1])
    return np.ascontiguousarray(points / np.linalg.norm(points, axis=1, keepdims=True), dtype=np.float32)


def timed_search(index, queries: np.ndarray, k: int, batch: int) -> tuple[float, np.ndarray]:
    """Seconds to search every query in batches of `batch`, and the (Q, k) rows found."""
    found = []
    start = time.perf_counter()
    for first in range(0, len(queries), batch):
        found.append(index.search(queries[first : first + batch], k)[1])
    return time.perf_counter() - start, np.concatenate(found)


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top k that the approximate top k holds."""
    return float(np.mean([len(set(a) & set(e)) / exact.shape[1] for a, e in zip(found, exact)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the collection")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise around each cluster centre (relative)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ivf", type=int, default=1024)
    parser.add_argument("--pq", type=int, nargs="+", default=[16, 64], help="sub-quantizers (one IVF-PQ index each)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--batch", type=int, nargs="+", default=[1000, 1], help="queries per search call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = clustered(rng, centres, args.n, args.spread)
    queries = clustered(rng, centres, args.queries, args.spread)

    start = time.perf_counter()
    exact = _faiss_index(vectors, None, None, 8)
    setup = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "queries": args.queries, "ivf": args.ivf,
             "threads": args.threads, "flat_build_s": round(time.perf_counter() - start, 2),
             "flat_bytes_per_vector": round(len(faiss.serialize_index(exact)) / args.n, 1)}
    print(json.dumps({"setup": setup}), flush=True)
    _, truth = exact.search(queries, 10)  # the exact top 10, what recall is measured against

    for pq in args.pq:
        start = time.perf_counter()
        approximate = _faiss_index(vectors, args.ivf, pq, 8)
        print(json.dumps({"pq": pq, "ivfpq_build_s": round(time.perf_counter() - start, 2),
                          "ivfpq_bytes_per_vector": round(len(faiss.serialize_index(approximate)) / args.n, 1)}), flush=True)
        ivf = faiss.extract_index_ivf(approximate)
        for batch in args.batch:
            # one query at a time is slow for the exact index: time that on a tenth of the queries
            subset = queries if batch > 1 else queries[: max(1, len(queries) // 10)]
            for nprobe in args.nprobe:
                ivf.nprobe = nprobe
                exact_times, approximate_times = [], []
                for _ in range(args.rounds):  # alternate, so noise hits both sides alike
                    seconds, _ = timed_search(exact, subset, 10, batch)
                    exact_times.append(seconds)
                    seconds, found = timed_search(approximate, subset, 10, batch)
                    approximate_times.append(seconds)
                exact_qps = len(subset) / statistics.median(exact_times)
                approximate_qps = len(subset) / statistics.median(approximate_times)
                print(json.dumps({"pq": pq, "batch": batch, "nprobe": nprobe,
                                  "recall@10": round(recall_at(found, truth[: len(subset)]), 4),
                                  "flat_qps": round(exact_qps, 1), "ivfpq_qps": round(approximate_qps, 1),
                                  "speedup": round(approximate_qps / exact_qps, 2)}), flush=True)

if __name__ == "__main__":
    main()
