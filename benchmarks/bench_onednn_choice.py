"""How stable `vlmkit serve --onednn auto`'s choice is: `serve.onednn.onednn_pays` in fresh processes.

How much faster a model's image tower runs with oneDNN differs from one process to the next, so one
process's timing can decide differently from the next one's (a conv-stem tiny ViT on an AMD EPYC:
0.9-1.3x by process). Each of `--processes` fresh processes builds the model (random weights, the
registry's configuration), times `--pairs` interleaved forward pairs (with oneDNN, without) on 16
random images after one warm-up pass, and then asks `onednn_pays`. Prints one JSON line per process
and a summary: the spread of the per-process median ratio (what `onednn_pays` judges), of the ratio
of each side's fastest pass (the rule before 2026-12-08), and how often each choice was made.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_onednn_choice.py align-tiny vsepp-tiny [--processes 40]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one_process(name: str, pairs: int) -> dict:
    """Runs in a fresh process: `pairs` timed pairs, then the library's own choice."""
    import torch

    import vlmkit
    from vlmkit.serve.onednn import SPEEDUP_NEEDED, TIMED_PAIRS, onednn_pays, timed_pair

    torch.manual_seed(0)
    model = vlmkit.create_model(name).eval()
    tower, pixels = model.tower("image"), model.dummy_batch(16)["pixels"]  # (16, 3, H, W)
    with torch.no_grad():
        torch.backends.mkldnn.enabled = True
        tower(pixels)  # oneDNN builds its primitives
        seconds = [timed_pair(tower, pixels) for _ in range(pairs)]  # [(with oneDNN, without)] per pair
    torch.backends.mkldnn.enabled = True
    start = time.perf_counter()
    chosen = onednn_pays(model)
    return {
        "model": name,
        "median_ratio": round(statistics.median(off / on for on, off in seconds[:TIMED_PAIRS]), 3),
        "ratio_of_minima": round(min(off for _, off in seconds) / min(on for on, _ in seconds), 3),
        "ms_with_without": [[round(on * 1e3, 1), round(off * 1e3, 1)] for on, off in seconds],
        "onednn_pays": chosen, "threshold": SPEEDUP_NEEDED, "choice_seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="registry names, e.g. align-tiny vsepp-tiny clip-rn50")
    parser.add_argument("--processes", type=int, default=20, help="fresh processes per model")
    parser.add_argument("--pairs", type=int, default=7, help="timed pairs per process (the first five give its median)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes < 1 or args.pairs < 1:
        parser.error("--processes and --pairs must be at least 1")
    if args.child:
        print(json.dumps(one_process(args.models[0], args.pairs)))
        return
    for name in args.models:
        rows = []
        for _ in range(args.processes):
            done = subprocess.run([sys.executable, __file__, name, "--pairs", str(args.pairs), "--child"],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"bench_onednn_choice: {name}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                sys.exit(2)  # an unknown name or a model without an image tower
            rows.append(json.loads(done.stdout))
            print(json.dumps(rows[-1]), flush=True)
        medians = sorted(row["median_ratio"] for row in rows)
        minima = sorted(row["ratio_of_minima"] for row in rows)
        print(json.dumps({
            "summary": name, "processes": len(rows), "threshold": rows[0]["threshold"],
            "median_ratio_min_median_max": [medians[0], round(statistics.median(medians), 3), medians[-1]],
            "ratio_of_minima_max": minima[-1],
            "on": sum(row["onednn_pays"] for row in rows), "off": sum(not row["onednn_pays"] for row in rows),
            "choice_seconds_max": max(row["choice_seconds"] for row in rows),
        }), flush=True)


if __name__ == "__main__":
    main()
