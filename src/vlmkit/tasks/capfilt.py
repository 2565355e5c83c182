"""CapFilt (BLIP, Li et al. 2022): bootstrap a noisy image-text dataset with a captioner and a filter.

For every image, a captioner (a model that `Generates`) writes N synthetic captions by nucleus
sampling, and a filter (a model that `MatchesImageText`) scores the web captions and the synthetic
ones with its image-text matching head; the captions whose match probability is above the threshold
are kept (BLIP drops a text when its ITM head predicts "unmatched", i.e. threshold 0.5). One model can
be both (`--model`), or two runs can split the roles (`--captioner` / `--filter`), as in the paper,
where both start from one pre-trained model and are fine-tuned apart.

    vlmkit capfilt --model RUN --data noisy.jsonl --out clean.jsonl [--samples N --top-p 0.9 --threshold 0.5]

The output is a JSONL dataset any trainer reads: each record keeps its other fields, `texts` holds
the kept captions (web first, then synthetic) and `capfilt` lists them with their `source` ("web" |
"synthetic") and the filter's `score`. Images the captioner cannot read are skipped and counted;
records left with no caption are dropped and counted. Nothing is written until the last image is
done (then atomically), so an interrupted run leaves no output file behind; an existing `--out` is
replaced only with `--overwrite`.

Sampling is seeded: the same `seed` and `batch_size` give the same synthetic captions (the draws of
one batch share one generator, so a batch of another size draws other captions).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from vlmkit.capabilities import Generates, MatchesImageText
from vlmkit.errors import UserError

DEFAULT_SAMPLES = 3
DEFAULT_TOP_P = 0.9  # BLIP's nucleus sampling
DEFAULT_THRESHOLD = 0.5  # ITM's "matched" when its match probability beats the no-match one


def check_settings(samples: int, top_p: float, threshold: float, batch_size: int) -> None:
    """Raise a UserError naming the first CapFilt setting out of range (before any work is done)."""
    if samples < 0:
        raise UserError(f"--samples {samples} is negative; give 0 (filter the web captions only) or more")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p} is not in (0, 1]; BLIP samples with 0.9")
    if not 0 <= threshold < 1:
        raise UserError(f"--threshold {threshold} is not in [0, 1); it is the lowest match probability kept, e.g. 0.5")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """The area under the ROC curve of `scores` for telling `positive` items from the others: the
    probability that a random positive scores above a random negative, ties counting half (the
    Mann-Whitney rank sum, as sklearn's `roc_auc_score`). 0.5 is chance; None when a class is empty."""
    import torch

    values = torch.tensor(list(scores), dtype=torch.float64)
    labels = torch.tensor(list(positive), dtype=torch.bool)
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if not num_pos or not num_neg:
        return None
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based ranks, tied values share their mean rank
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def filter_quality(scores: Sequence[float], kinds: Sequence[str | None], threshold: float) -> dict:
    """How well a filter's `scores` separate clean captions (`kinds[i]` None) from corrupted ones
    (`kinds[i]` the corruption, e.g. "color"), keeping a caption when its score is above `threshold`.

    Returns `roc_auc` (threshold-free: 1.0 ranks every clean caption above every corrupted one, 0.5
    is chance), `kept_precision` (the share of kept captions that are clean; None if none is kept),
    `clean_kept` (the share of clean captions kept) and `dropped_by_kind` ({kind: share dropped})."""
    clean = [kind is None for kind in kinds]
    kept = [score > threshold for score in scores]
    num_kept, num_clean = sum(kept), sum(clean)
    by_kind: dict[str, list[int]] = {}
    for keep, kind in zip(kept, kinds):
        if kind is not None:
            tally = by_kind.setdefault(kind, [0, 0])
            tally[0] += not keep
            tally[1] += 1
    return {
        "roc_auc": roc_auc(scores, clean),
        "kept_precision": sum(k and c for k, c in zip(kept, clean)) / num_kept if num_kept else None,
        "clean_kept": sum(k and c for k, c in zip(kept, clean)) / num_clean if num_clean else None,
        "dropped_by_kind": {kind: dropped / total for kind, (dropped, total) in sorted(by_kind.items())},
    }


def _candidates(web: Sequence[str], synthetic: Sequence[str]) -> list[tuple[str, str]]:
    """(text, source) pairs to score: the web captions, then the synthetic ones; a text already in the
    list (a repeated sample, or a sample equal to a web caption) is scored once, under its first source."""
    seen, result = set(), []
    for source, texts in (("web", web), ("synthetic", synthetic)):
        for text in texts:
            text = text.strip()
            if text and text not in seen:
                seen.add(text)
                result.append((text, source))
    return result


def run_capfilt(captioner, matcher, records: Sequence[dict], *, samples: int = DEFAULT_SAMPLES,
                top_p: float = DEFAULT_TOP_P, threshold: float = DEFAULT_THRESHOLD, seed: int = 0,
                batch_size: int = 32, max_new_tokens: int | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """CapFilt over `records`: (output records, summary).

    `captioner` must `Generate` (when `samples` > 0) and `matcher` must `MatchesImageText`; they may be
    the same model. Each output record is its input with `texts` replaced by the kept captions and a
    `capfilt` list of {text, source, score}; records whose image cannot be read are skipped, those
    with no kept caption dropped, both counted in the summary. Records carrying `caption_noise` (the
    corrupted captions of `vlmkit data synth --caption-noise`) also get the filter's hit rates on
    them in `summary["caption_noise"]`.
    """
    import torch
    from tqdm import tqdm

    from vlmkit.data.formats import CorruptImage, load_image

    check_settings(samples, top_p, threshold, batch_size)
    if samples:
        captioner.require(Generates, task="capfilt (the captioner)")
    matcher.require(MatchesImageText, task="capfilt (the filter)")
    decoding: dict[str, Any] = {"do_sample": True, "top_p": top_p}
    if max_new_tokens is not None:
        decoding["max_new_tokens"] = max_new_tokens
    out: list[dict] = []
    skipped: list[str] = []
    counts = {"web": [0, 0], "synthetic": [0, 0]}  # source: [scored, kept]
    noise = {"noisy_web": 0, "noisy_web_dropped": 0, "clean_web": 0, "clean_web_kept": 0}
    web_scores: list[float] = []  # the web captions of records carrying noise labels, for filter_quality
    web_kinds: list[str | None] = []
    seen_noise = False
    dropped_records = 0
    bar = tqdm(total=len(records), desc="capfilt", unit="image", file=sys.stderr, disable=not progress, mininterval=0.5)
    was_training = captioner.training, matcher.training
    captioner.eval(), matcher.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                chunk, images = [], []
                for record in records[start : start + batch_size]:
                    try:
                        images.append(load_image(record["image"]))
                        chunk.append(record)
                    except CorruptImage:
                        skipped.append(record["image"])
                bar.update(len(records[start : start + batch_size]))
                if not chunk:
                    continue
                synthetic: list[list[str]] = [[] for _ in chunk]
                if samples:
                    pixels = captioner.preprocess(images).to(captioner.device)  # (b, 3, H, W)
                    # One generator per batch, seeded by the run's seed and the batch's first record.
                    texts = captioner.generate(pixels.repeat_interleave(samples, dim=0),
                                               seed=seed * 1_000_003 + start, **decoding)  # (b*N) texts
                    for row, text in enumerate(texts):
                        synthetic[row // samples].append(text)
                candidates = [_candidates(record.get("texts") or [], synthetic[row]) for row, record in enumerate(chunk)]
                owner = torch.tensor([row for row, items in enumerate(candidates) for _ in items], dtype=torch.long)
                texts = [text for items in candidates for text, _ in items]
                scores = torch.empty(0)
                if texts:
                    pixels = matcher.preprocess(images).to(matcher.device)  # (b, 3, H, W)
                    # `match` is the capability's probability; each pair re-reads its image (the
                    # capability's per-image features give the match logit only, not a probability).
                    scores = torch.cat([
                        matcher.match(pixels.index_select(0, owner[part : part + batch_size].to(matcher.device)),
                                      matcher.tokenize(texts[part : part + batch_size]).to(matcher.device)).float().cpu()
                        for part in range(0, len(texts), batch_size)
                    ])  # (n_texts,)
                position = 0
                for record, items in zip(chunk, candidates):
                    kept = []
                    noisy = {item.get("text"): item.get("kind", "corrupted")
                             for item in record.get("caption_noise") or [] if isinstance(item, dict)}
                    seen_noise = seen_noise or bool(noisy)
                    for text, source in items:
                        score = float(scores[position])
                        position += 1
                        keep = score > threshold
                        counts[source][0] += 1
                        counts[source][1] += keep
                        if keep:
                            kept.append({"text": text, "source": source, "score": round(score, 6)})
                        if source == "web":  # every web caption: a record without noise labels is clean
                            web_scores.append(score)
                            web_kinds.append(noisy.get(text))
                        if source == "web" and noisy and text in noisy:
                            noise["noisy_web"] += 1
                            noise["noisy_web_dropped"] += not keep
                        elif source == "web" and noisy:
                            noise["clean_web"] += 1
                            noise["clean_web_kept"] += keep
                    if not kept:
                        dropped_records += 1
                        continue
                    rest = {key: value for key, value in record.items() if key not in ("image", "texts")}
                    out.append({"image": record["image"], "texts": [item["text"] for item in kept], "capfilt": kept, **rest})
    finally:
        bar.close()
        captioner.train(was_training[0]), matcher.train(was_training[1])
    summary = {
        "images": len(records), "skipped_images": len(skipped), "skipped_files": len(set(skipped)),
        "records_written": len(out), "records_without_kept_caption": dropped_records,
        "web_captions": {"scored": counts["web"][0], "kept": counts["web"][1]},
        "synthetic_captions": {"scored": counts["synthetic"][0], "kept": counts["synthetic"][1]},
        "samples": samples, "top_p": top_p, "threshold": threshold, "seed": seed,
    }
    if seen_noise:
        summary["caption_noise"] = {**noise, **filter_quality(web_scores, web_kinds, threshold)}
    if skipped:
        files = sorted(set(skipped), key=skipped.index)
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        print(f"vlmkit: capfilt skipped {len(skipped)} record(s) whose image cannot be used: {', '.join(files[:3])}{more}",
              file=sys.stderr)
    return out, summary


def records_jsonl(records: Sequence[dict], out: str | os.PathLike) -> bytes:
    """The output records as JSONL bytes, local image paths made relative to the folder of `out`
    (so the dataset moves with its images), shard references (`tar://...`) kept as they are."""
    import json

    from vlmkit.data.formats import TAR_PREFIX

    folder = Path(out).resolve().parent
    lines = []
    for record in records:
        image = record["image"]
        if not image.startswith(TAR_PREFIX):
            image = os.path.relpath(image, folder)
        lines.append(json.dumps({**record, "image": image}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


# ---- the command line -----------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add the `capfilt` verb."""
    parser = subparsers.add_parser(
        "capfilt", help="CapFilt: caption a noisy image-text dataset and keep the captions a matching filter accepts",
        description="For every image, sample synthetic captions with a captioner and keep the web and synthetic "
        "captions an image-text matching filter accepts; writes a JSONL dataset with the filter's scores and "
        "prints a JSON summary.")
    parser.add_argument("--model", help="run folder that both captions and filters (Generates + MatchesImageText)")
    parser.add_argument("--captioner", help="run folder that captions (default: --model)")
    parser.add_argument("--filter", help="run folder that filters (default: --model)")
    parser.add_argument("--data", required=True, help="the noisy records (JSONL, CSV, shards)")
    parser.add_argument("--out", required=True, help="output JSONL file (missing folders are created)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="synthetic captions sampled per image (default %(default)s; 0 = filter the web captions only)")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling mass (default %(default)s)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="keep a caption whose match probability is above this (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest synthetic caption (default: the model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.set_defaults(func=_capfilt)


def _capfilt(args: argparse.Namespace) -> int:
    import vlmkit
    from vlmkit.cli import print_json
    from vlmkit.data.formats import read_records
    from vlmkit.io import check_output_file, write_output_file

    check_settings(args.samples, args.top_p, args.threshold, args.batch_size)
    captioner_path, filter_path = args.captioner or args.model, args.filter or args.model
    if captioner_path is None or filter_path is None:
        raise UserError("capfilt needs --model RUN (one model captions and filters), or both --captioner RUN and --filter RUN")
    out = check_output_file(args.out, "--out")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")
    records = read_records(args.data)
    if not records:
        raise UserError(f"--data {args.data} holds no records; give a dataset with images and captions")
    captioner = vlmkit.load(captioner_path)
    matcher = captioner if filter_path == captioner_path else vlmkit.load(filter_path)
    kept, summary = run_capfilt(captioner, matcher, records, samples=args.samples, top_p=args.top_p,
                                threshold=args.threshold, seed=args.seed, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    if summary["skipped_images"] == len(records):
        raise UserError(f"no image of the {len(records)} record(s) in {args.data} can be read, so nothing was written; "
                        f"fix the dataset")
    if not kept:
        raise UserError(f"the filter kept no caption at --threshold {args.threshold}, so nothing was written; lower "
                        f"the threshold or train the filter longer")
    write_output_file(out, records_jsonl(kept, out), "--out")
    print_json({"out": str(out), "captioner": captioner_path, "filter": filter_path, **summary})
    return 0
