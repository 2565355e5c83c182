"""Reference rows for the text-to-image table: what the judge scores on *real* images, judged by the
very code `vlmkit eval text-to-image` runs (tasks.imagine.evaluate_text_to_image, same prompts,
same order), so a generator's numbers can be read against them.

- `real`: each prompt's own test image, resized to the autoencoder's image size (32 px for
  dvae-tiny): the most a generator at that size can score;
- `reconstructed`: the same images through the discrete VAE (argmax codes, decoded): the most a
  DALL-E whose transformer sampled the right codes can score with this VAE.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_to_image_references.py \
        --autoencoder runs/dvae-tiny --judge runs/clip-tiny --data DATA/test.jsonl [--n-prompts 100]

Without --autoencoder, `--image-size S` gives the `real` row alone, at S px (a diffusion model's size).
"""
from __future__ import annotations

import argparse
import json

import torch

import vlmkit
from vlmkit.capabilities import Imagines
from vlmkit.data.formats import load_image, read_records
from vlmkit.data.transforms import ImageTransform
from vlmkit.tasks.imagine import evaluate_text_to_image, prompt_records


class ReplayImages:
    """An `Imagines` stand-in that returns precomputed images in prompt order (n = 1, no re-ranking)."""

    family = "replay"
    capabilities = (Imagines,)
    imagine_options = ()

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.position = images, 0

    def imagine(self, prompts, seed: int = 0) -> torch.Tensor:
        chunk = self.images[self.position : self.position + len(prompts)]
        self.position += len(prompts)
        return chunk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--autoencoder", help="a run that reconstructs images (a dvae run): real and reconstructed rows")
    parser.add_argument("--image-size", type=int, help="without --autoencoder: the real row at this size (e.g. 32)")
    parser.add_argument("--judge", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n-prompts", type=int, default=100)
    args = parser.parse_args()
    if (args.autoencoder is None) == (args.image_size is None):
        parser.error("give --autoencoder RUN (real and reconstructed rows) or --image-size S (the real row)")
    judge = vlmkit.load(args.judge)
    records = read_records(args.data)
    count = len(prompt_records(records, n_prompts=args.n_prompts))
    labelled = [record for record in records if record.get("label") is not None][:count]  # prompt_records' order
    images = [load_image(record["image"]) for record in labelled]
    if args.autoencoder is None:
        unit = ImageTransform(args.image_size, mean=(0, 0, 0), std=(1, 1, 1))  # the eval geometry, pixels left in [0, 1]
        rows = [("real", unit.batch(images))]  # (P, 3, S, S)
    else:
        autoencoder = vlmkit.load(args.autoencoder)
        with torch.no_grad():
            pixels = autoencoder.preprocess(images)
            rows = [("real", autoencoder.unit_pixels(pixels)),  # (P, 3, S, S) in [0, 1]
                    ("reconstructed", autoencoder.reconstruct(pixels))]
    for name, images in rows:
        result = evaluate_text_to_image(ReplayImages(images), judge, records, n_prompts=args.n_prompts)
        print(json.dumps({"images": name, "image_size": int(images.shape[-1]), **result}))


if __name__ == "__main__":
    main()
