"""`vlmkit score captions` end to end, side by side with pycocoevalcap on the same files.

    PYTHONPATH=src python benchmarks/bench_score_cli.py [--images 5000] [--refs 5] [--style coco|varied]
                                                        [--repeat 5]

Writes the corpus bench_metrics.py scores (same generator, seed and defaults) to a COCO
results file and a COCO annotations file, then times, alternating `--repeat` times:

- vlmkit: `python -m vlmkit score captions --pred P --refs R` as a subprocess, so the time
  includes interpreter start, imports, reading the JSON files and printing the result;
- pycocoevalcap, also as a subprocess on the same two files: a small script that reads them,
  runs its PTBTokenizer (Java) and its BLEU-1..4, ROUGE-L and CIDEr-D scorers, and prints the
  scores. This is what a user of either tool waits for.

It also prints pycocoevalcap's in-process time (tokenizer + scorers, as bench_metrics.py
times it: no interpreter start, no imports, no file reading), the ratio against that, and
the time of `vlmkit --help` next to a bare `python -c pass`. Times are each side's best run
and the median run (with the CPU time of the subprocesses: user + system, children included,
the JVM's threads too); the ratio is of wall times, best/best and the median of per-round ratios.
Exits non-zero if a score differs from pycocoevalcap's by more than 1e-9.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")

# pycocoevalcap on the two files, the way COCOEvalCap feeds it (gts/res dicts of {caption}).
REFERENCE_SCRIPT = r"""
import json, sys
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

with open(sys.argv[1]) as handle:
    predictions = json.load(handle)
with open(sys.argv[2]) as handle:
    annotations = json.load(handle)["annotations"]
res = {entry["image_id"]: [{"caption": entry["caption"]}] for entry in predictions}
gts = {image_id: [] for image_id in res}
for entry in annotations:
    gts[entry["image_id"]].append({"caption": entry["caption"]})
tokenizer = PTBTokenizer()
gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
rouge, _ = Rouge().compute_score(gts, res)
cider, _ = Cider().compute_score(gts, res)
print(json.dumps({"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
                  "ROUGE-L": float(rouge), "CIDEr": float(cider)}))
"""


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str], env: dict, cpu: list[float] | None = None) -> tuple[float, str]:
    """Wall seconds of `command` and its stdout; its CPU seconds (user + system, its own
    children included) are appended to `cpu`."""
    cpu_before = _cpu_of_children()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if cpu is not None:
        cpu.append(_cpu_of_children() - cpu_before)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stdout


def _in_process_reference(predictions: dict, references: dict) -> float:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
    from bench_metrics import run_reference

    saved_stderr = os.dup(2)  # the Java tokenizer's warnings, which the subprocess runs capture
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        start = time.perf_counter()
        run_reference(predictions, references)
        return time.perf_counter() - start
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)


def _summary(name: str, times: list[float], cpu: list[float] | None = None) -> str:
    line = f"{name}: {min(times):.3f} s best, {statistics.median(times):.3f} s median (of {len(times)})"
    if cpu:
        line += f"; CPU {min(cpu):.3f} s best, {statistics.median(cpu):.3f} s median"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--style", choices=("coco", "varied"), default="coco")
    parser.add_argument("--tricky", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    sys.path.insert(0, os.path.abspath(SRC))
    from vlmkit.metrics.synthetic import random_corpus

    predictions, references = random_corpus(args.images, args.refs, seed=0, tricky=args.tricky, style=args.style)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory(prefix="bench_score_cli.") as folder:
        pred, refs = os.path.join(folder, "pred.json"), os.path.join(folder, "refs.json")
        with open(pred, "w", encoding="utf-8") as handle:
            json.dump([{"image_id": i, "caption": c} for i, c in predictions.items()], handle)
        with open(refs, "w", encoding="utf-8") as handle:
            json.dump({"annotations": [{"image_id": i, "caption": c} for i, cs in references.items() for c in cs]},
                      handle)
        ours_command = [sys.executable, "-m", "vlmkit", "score", "captions", "--pred", pred, "--refs", refs]
        reference_command = [sys.executable, "-c", REFERENCE_SCRIPT, pred, refs]
        help_command = [sys.executable, "-m", "vlmkit", "--help"]
        bare_command = [sys.executable, "-c", "pass"]

        ours_times, ref_times, inproc_times, help_times, bare_times = [], [], [], [], []
        ours_cpu, ref_cpu = [], []
        for _ in range(args.repeat):  # alternate, so both sides see the same machine load
            seconds, ours_out = _timed(ours_command, env, ours_cpu)
            ours_times.append(seconds)
            seconds, ref_out = _timed(reference_command, env, ref_cpu)
            ref_times.append(seconds)
            inproc_times.append(_in_process_reference(predictions, references))
            help_times.append(_timed(help_command, env)[0])
            bare_times.append(_timed(bare_command, env)[0])

    ours, ref = json.loads(ours_out), json.loads(ref_out)
    worst = max(abs(ours[key] - ref[key]) for key in KEYS)
    ratios = sorted(r / o for r, o in zip(ref_times, ours_times))
    inproc_ratios = sorted(r / o for r, o in zip(inproc_times, ours_times))
    print(f"data: {args.images} images x {args.refs} refs, style={args.style}, tricky={args.tricky}")
    print(f"load average {' '.join(f'{value:.1f}' for value in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(_summary("vlmkit score captions (subprocess)          ", ours_times, ours_cpu))
    print(_summary("pycocoevalcap (subprocess: read + Java PTB + BLEU + ROUGE-L + CIDEr-D)", ref_times, ref_cpu))
    print(_summary("pycocoevalcap (in process, as bench_metrics)", inproc_times))
    print(_summary("vlmkit --help                               ", help_times))
    print(_summary("python -c pass                              ", bare_times))
    print(f"speed-up vs pycocoevalcap subprocess: {min(ref_times) / min(ours_times):.1f}x best/best, "
          f"{ratios[len(ratios) // 2]:.1f}x median per-round ratio")
    print(f"speed-up vs pycocoevalcap in process: {min(inproc_times) / min(ours_times):.1f}x best/best, "
          f"{inproc_ratios[len(inproc_ratios) // 2]:.1f}x median per-round ratio")
    print(f"max |score difference|: {worst:.2e}")
    if worst > 1e-9:
        raise SystemExit(f"scores differ from pycocoevalcap's: {ours} vs {ref}")


if __name__ == "__main__":
    main()
