"""Peak memory and time of `vlmkit classify` / `vlmkit embed` on the corpus's hostile inputs.

Generates the bad-input corpus (tests/reliability/make_corpus.py) in a temporary folder, then runs
each command in a fresh process and reports its exit code, peak RSS (`resource`, RUSAGE_CHILDREN
of a one-child wrapper) and wall time. `--src` picks the source tree the commands import, so a
checkout without the input limits can be measured side by side with one that has them:

    .venv/bin/python benchmarks/bench_input_limits.py --model RUN [--src src]

RUN is any run folder of an image-text model (a tiny one is enough: the cost measured is the
input's, not the model's).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ONE = r"""
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
tail = done.stderr.strip().splitlines()[-1][:160] if done.stderr.strip() else ""
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, tail, sep="\t")
"""


def measure(src: str, argv: list[str]) -> dict:
    """Run `vlmkit ARGV` importing `src`: exit code, peak RSS in MB, seconds, last stderr line."""
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _ONE, sys.executable, "-m", "vlmkit.cli", *argv],
                          capture_output=True, text=True, env=env)
    code, peak, tail = done.stdout.rstrip("\n").split("\t")
    return {"exit": int(code), "peak_mb": int(peak), "seconds": round(time.perf_counter() - start, 1), "stderr": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run folder of an image-text model")
    parser.add_argument("--src", default=str(Path(__file__).parents[1] / "src"), help="source tree to import")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "reliability"))
    from make_corpus import make_corpus

    with tempfile.TemporaryDirectory() as root:
        corpus = make_corpus(root)
        classify = ["classify", "--model", args.model, "--labels", "a", "b", "--"]
        cases = {
            "classify 1 x 120,000 px PNG": classify + [str(corpus.bad_images["thin_120k"])],
            "classify 13,340 x 13,340 px PNG (178 MP)": classify + [str(corpus.bad_images["huge_178mp"])],
            "classify 16,000 x 1 px strip": classify + [str(corpus.odd_images["strip_16k"])],
            "classify 6,324 x 6,324 px PNG (40 MP)": classify + [str(corpus.odd_images["at_pixel_limit"])],
            "embed a record with an 11 MB caption": ["embed", "--model", args.model, "--data",
                                                     str(corpus.data["huge_caption"]), "--out",
                                                     str(Path(root) / "e.safetensors")],
        }
        for name, argv in cases.items():
            print(json.dumps({"case": name, "src": args.src, **measure(args.src, argv)}), flush=True)


if __name__ == "__main__":
    main()
