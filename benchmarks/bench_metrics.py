"""Caption metrics speed, side by side with pycocoevalcap on the same data.

    PYTHONPATH=src python benchmarks/bench_metrics.py [--images 5000] [--refs 5] [--style coco|varied]

Times PTB tokenization + BLEU-1..4 + ROUGE-L + CIDEr-D for pycocoevalcap (Java tokenizer +
its Python scorers) and for vlmkit.metrics on one synthetic corpus, checks the scores agree,
and prints the ratio. The two sides alternate `--repeat` times (shared machines are noisy, and
alternating exposes both to the same load); the reported times are each side's best run and
the ratio is also given as the median of the per-round ratios. Exits non-zero if any score
differs from pycocoevalcap's by more than 1e-9.
"""
from __future__ import annotations

import argparse
import time


def run_reference(predictions, references):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": c} for c in references[i]] for i in predictions}
    res = {i: [{"caption": predictions[i]}] for i in predictions}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": bleu[3], "ROUGE-L": float(rouge), "CIDEr": float(cider)}


def run_ours(predictions, references):
    from vlmkit.metrics.caption import score_captions

    result = score_captions(predictions, references, metrics=("bleu", "rouge", "cider"))
    return {"BLEU-4": result["BLEU-4"], "ROUGE-L": result["ROUGE-L"], "CIDEr": result["CIDEr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--style", choices=("coco", "varied"), default="coco")
    parser.add_argument("--tricky", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from vlmkit.metrics.synthetic import random_corpus

    predictions, references = random_corpus(args.images, args.refs, seed=0, tricky=args.tricky, style=args.style)
    ours_times, ref_times = [], []
    for _ in range(args.repeat):  # alternate, so both sides see the same machine load
        start = time.perf_counter()
        ours = run_ours(predictions, references)
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ref = run_reference(predictions, references)
        ref_times.append(time.perf_counter() - start)
    worst = max(abs(ours[k] - ref[k]) for k in ours)
    ratios = sorted(r / o for r, o in zip(ref_times, ours_times))
    from vlmkit.metrics.ngrams import CORES

    print(f"data: {args.images} images x {args.refs} refs, style={args.style}, tricky={args.tricky}; "
          f"{CORES} core(s) for vlmkit")
    print(f"pycocoevalcap (Java PTB + BLEU + ROUGE-L + CIDEr-D): {min(ref_times):.3f} s (best of {args.repeat})")
    print(f"vlmkit.metrics (same):                              {min(ours_times):.3f} s (best of {args.repeat})")
    print(f"speed-up: {min(ref_times) / min(ours_times):.1f}x best/best, {ratios[len(ratios) // 2]:.1f}x median "
          f"per-round ratio   max |score difference|: {worst:.2e}")
    if worst > 1e-9:
        raise SystemExit(f"scores differ from pycocoevalcap's: {ours} vs {ref}")

if __name__ == "__main__":
    main()
