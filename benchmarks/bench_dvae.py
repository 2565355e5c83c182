"""dVAE throughput side by side: encode and decode (images/s), decode at batch 1 vs batched, and
what the same images cost to sample with the DALL-E transformer (KV cache on and off).

One process, alternating rounds, so machine noise hits every measurement alike; read the ratios:
- `decode_batched_over_batch1`: batched decoding of the same codes vs one image per call;
- `decode_over_sampling`: how many times faster the dVAE decodes an image than the transformer
  samples its 64 tokens (the share of `imagine` the VAE costs);
- `cached_over_uncached`: sampling with the KV cache vs re-running the whole sequence every token.
Models: `--dvae RUN` / `--dalle RUN` (trained runs), or fresh tiny ones (speed does not depend on
the weights).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dvae.py [--batch 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import vlmkit


def _timed(function, images: int) -> float:
    start = time.perf_counter()
    function()
    return images / (time.perf_counter() - start)  # images/s


def _models(args):
    if args.dalle:
        dalle = vlmkit.load(args.dalle)
    else:
        from vlmkit.tokenizers import train_clip_bpe

        torch.manual_seed(0)
        dalle = vlmkit.create_model("dalle-tiny").eval()
        dalle.tokenizer = train_clip_bpe(["a red circle", "a blue square on the left"] * 20, vocab_size=600)
        dalle.tokenizer.context_length = dalle.config.text.context_length
        dalle.config.text.eos_token_id = dalle.tokenizer.eos_id
    vae = vlmkit.load(args.dvae).vae if args.dvae else dalle.vae
    return vae.eval(), dalle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64, help="images per batched call")
    parser.add_argument("--samples", type=int, default=8, help="images sampled by the transformer per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dvae", help="a dvae run (default: a fresh dvae-tiny inside dalle-tiny)")
    parser.add_argument("--dalle", help="a dalle run (default: a fresh dalle-tiny)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    vae, dalle = _models(args)
    size = vae.config.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle"] * args.samples
    with torch.inference_mode():
        codes = vae.encode(pixels)
        vae.decode(codes[:2]), dalle.sample_tokens(prompts[:1], seed=0)  # warm-up
        measured: dict[str, list[float]] = {key: [] for key in
                                            ("encode", "decode", "decode_batch1", "sample_cached", "sample_uncached")}
        for _ in range(args.rounds):
            measured["encode"].append(_timed(lambda: vae.encode(pixels), args.batch))
            measured["decode"].append(_timed(lambda: vae.decode(codes), args.batch))
            measured["decode_batch1"].append(_timed(lambda: [vae.decode(codes[i : i + 1]) for i in range(args.batch)], args.batch))
            measured["sample_cached"].append(_timed(lambda: dalle.sample_tokens(prompts, seed=0), args.samples))
            measured["sample_uncached"].append(_timed(lambda: dalle.sample_tokens(prompts, seed=0, use_cache=False), args.samples))
    medians = {key: statistics.median(values) for key, values in measured.items()}
    for key, value in medians.items():
        print(json.dumps({"measure": key, "images_per_s": round(value, 2), "rounds": [round(v, 2) for v in measured[key]]}))
    print(json.dumps({
        "image_size": size, "tokens_per_image": vae.config.num_image_tokens, "batch": args.batch, "samples": args.samples,
        "threads": torch.get_num_threads(),
        "decode_batched_over_batch1": round(medians["decode"] / medians["decode_batch1"], 2),
        "decode_over_sampling": round(medians["decode"] / medians["sample_cached"], 1),
        "cached_over_uncached": round(medians["sample_cached"] / medians["sample_uncached"], 2),
    }))


if __name__ == "__main__":
    main()
