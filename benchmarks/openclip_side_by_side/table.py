"""Score trained runs side by side with one evaluation code path and print one table.

Every run (a vlmkit run folder, or the OpenCLIP hub folder oc_train.py writes, which `vlmkit.load` reads)
is scored by `vlmkit eval zeroshot` (templates ensembled, the test classes only) and `vlmkit eval
retrieval` on the same test records, so the OpenCLIP and vlmkit numbers differ by training alone.
Usage (vlmkit's python): table.py --data DATA/test.jsonl [--templates DATA/templates.txt] NAME=RUN ... [--json OUT]
Zero-shot scores the records with a 'label' (classes = their distinct labels); retrieval all records.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def score(run: str, data: str, templates: str | None) -> dict:
    """Zero-shot and retrieval figures of one run, from vlmkit's evaluation commands (their stdout JSON)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "vlmkit", "eval"]
    zeroshot = subprocess.run(command + ["zeroshot", "--model", run, "--data", data]
                              + (["--templates", templates] if templates else []),
                              check=True, capture_output=True, text=True, env=env)
    retrieval = subprocess.run(command + ["retrieval", "--model", run, "--data", data],
                               check=True, capture_output=True, text=True, env=env)
    return {"zeroshot": json.loads(zeroshot.stdout), "retrieval": json.loads(retrieval.stdout)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--templates", help="zero-shot templates, one per line (default: vlmkit eval zeroshot's own)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN")
    args = parser.parse_args(argv)
    results = {}
    for item in args.runs:
        name, run = item.split("=", 1)
        results[name] = score(run, args.data, args.templates)
        print(f"scored {name}", file=sys.stderr)
    lines = ["| run | zero-shot top-1 | top-5 | image->text R@1 | R@5 | text->image R@1 | R@5 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        z, r = result["zeroshot"], result["retrieval"]
        lines.append(f"| {name} | {z['top1']:.3f} | {z['top5']:.3f} | {r['i2t_r1']:.3f} | {r['i2t_r5']:.3f} | "
                     f"{r['t2i_r1']:.3f} | {r['t2i_r5']:.3f} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
