"""Score trained runs side by side with one evaluation code path and print one table.

Every run (a vlmkit run folder, or the OpenCLIP hub folder oc_train.py writes, which `vlmkit.load` reads)
is scored by `vlmkit eval zeroshot` (templates ensembled, the test classes only) and `vlmkit eval
retrieval` on the same test records, so the OpenCLIP and vlmkit numbers differ by training alone.
Usage (vlmkit's python): table.py --data DATA/test.jsonl [--templates DATA/templates.txt] NAME=RUN ... [--json OUT]
Zero-shot scores the records with a 'label' (classes = their distinct labels); retrieval all records.
NAME=RUN1,RUN2,... (the same settings at several seeds) scores each run and prints each figure's mean and
sample standard deviation over them, "0.056 ± 0.009 (5)"; the JSON keeps every run's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

FIGURES = (("zeroshot", "top1"), ("zeroshot", "top5"), ("retrieval", "i2t_r1"), ("retrieval", "i2t_r5"),
           ("retrieval", "t2i_r1"), ("retrieval", "t2i_r5"))


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
        name, joined = item.split("=", 1)
        runs = joined.split(",")
        scored = [score(run, args.data, args.templates) for run in runs]
        results[name] = scored[0] if len(runs) == 1 else {"runs": runs, "seeds": scored}
        print(f"scored {name}", file=sys.stderr)
    lines = ["| run | zero-shot top-1 | top-5 | image->text R@1 | R@5 | text->image R@1 | R@5 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(result, task, key) for task, key in FIGURES) + " |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


def _cell(result: dict, task: str, key: str) -> str:
    """One run's figure, or over several seeds their mean ± sample standard deviation (and how many)."""
    if "seeds" not in result:
        return f"{result[task][key]:.3f}"
    values = [seed[task][key] for seed in result["seeds"]]
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)})"


if __name__ == "__main__":
    main()
