"""Turn a vlmkit JSONL (records with "image" and "texts") into the CSV OpenCLIP's trainer reads (filepath,title).

Image paths are written absolute (a relative "image" is taken relative to the JSONL's folder). OpenCLIP
counts one row per image-caption pair and runs floor(rows / batch) steps per epoch, dropping the last
partial batch. By default every caption of every image is one row. With --rows-per-image N each image
gives exactly N rows, its captions taken in turn (N larger than its caption count repeats them), so one
epoch sees each image N times, as N epochs of vlmkit's sampler (one random caption per image per visit)
do: N = steps * batch / images gives one OpenCLIP epoch of exactly that many steps when it divides.
Standard library only, so either environment's python runs it.

Usage: jsonl_to_csv.py DATA/train.jsonl DATA/train.csv [--rows-per-image N]
"""
from __future__ import annotations

import argparse
import csv
import json
import os


def rows(path: str, rows_per_image: int | None = None) -> list[tuple[str, str]]:
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            texts = [text for text in record.get("texts") or [] if text and text.strip()]
            if "image" not in record or not texts:
                raise SystemExit(f"{path}:{number}: a record needs an 'image' and at least one caption in 'texts'")
            image = record["image"] if os.path.isabs(record["image"]) else os.path.join(root, record["image"])
            count = rows_per_image or len(texts)
            out.extend((image, texts[index % len(texts)]) for index in range(count))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jsonl"), parser.add_argument("csv")
    parser.add_argument("--rows-per-image", type=int, default=None,
                        help="exactly N rows per image, captions in turn (default: one row per caption)")
    args = parser.parse_args(argv)
    pairs = rows(args.jsonl, args.rows_per_image)
    with open(args.csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        writer.writerows(pairs)
    print(f"{args.csv}: {len(pairs)} rows from {len({image for image, _ in pairs})} images "
          f"({len(pairs) // 128} steps per epoch at batch 128)")


if __name__ == "__main__":
    main()
