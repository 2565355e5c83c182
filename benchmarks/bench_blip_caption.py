"""BLIP captioning speed: vlmkit's cached greedy decoding vs HF `BlipForConditionalGeneration.generate`.

Both sides are the same weights: a randomly initialised HF BlipForConditionalGeneration saved to a
temporary folder and loaded by `vlmkit.load` (strict, parity-tested in tests/interop/test_hf_blip.py).
Greedy decoding of exactly `--new-tokens` tokens (min = max, so no row stops early), image encoding
included, batch `--batch`. The two run in alternating rounds in one process so machine noise hits
both; read the ratio. Prints one JSON line per measurement and a summary line.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_blip_caption.py [--batch 8] [--new-tokens 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import vlmkit
from vlmkit.generation import generate


def make_hf(args):
    from transformers import BlipConfig, BlipForConditionalGeneration

    vision = dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, image_size=args.image, patch_size=args.patch)
    text = dict(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, encoder_hidden_size=args.width, max_position_embeddings=64,
                bos_token_id=args.vocab - 2, sep_token_id=3, pad_token_id=0, eos_token_id=3)
    torch.manual_seed(0)
    return BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text)).eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    hf = make_hf(args)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = vlmkit.load(folder)
    pixels = torch.randn(args.batch, 3, args.image, args.image, generator=torch.Generator().manual_seed(1))
    n = args.new_tokens

    @torch.no_grad()
    def run_vlmkit():
        step, prompt = ours.decoding_setup(pixels, None)
        return generate(step, prompt, max_new_tokens=n, min_new_tokens=n, eos_token_id=ours.config.text.eos_token_id).tokens

    @torch.no_grad()
    def run_hf():
        return hf.generate(pixel_values=pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)[:, 1:]

    assert torch.equal(run_vlmkit(), run_hf()), "the two decoders disagree; the comparison would be meaningless"
    times = {"vlmkit": [], "hf": []}
    for round_index in range(args.rounds):
        for name, run in (("vlmkit", run_vlmkit), ("hf", run_hf)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(json.dumps({"round": round_index, "who": name, "seconds": round(times[name][-1], 4)}))
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({"summary": "blip greedy captioning", "batch": args.batch, "new_tokens": n,
                      "speedup_best": round(best["hf"] / best["vlmkit"], 2),
                      "speedup_median": round(median["hf"] / median["vlmkit"], 2),
                      "vlmkit_best_s": round(best["vlmkit"], 4), "hf_best_s": round(best["hf"], 4),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
