"""vlmkit CLIP vs HF transformers CLIPModel at the same configuration, side by side, on the CPU.

Measures training samples/s (forward + backward + AdamW step) and image-embedding images/s.
The two models are timed in alternating rounds in one process, so machine noise hits both;
the figure to read is the ratio. Prints one JSON line per measurement and a summary line.

    .venv/bin/python benchmarks/bench_clip_cpu.py [--batch 128] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import vlmkit


def make_vlmkit(args):
    return vlmkit.create_model("clip-tiny", **{
        "vision.patch_size": args.patch, "vision.width": args.width, "vision.depth": args.layers, "vision.heads": args.heads,
        "text.width": args.width, "text.depth": args.layers, "text.heads": args.heads, "text.context_length": args.context,
        "text.vocab_size": args.vocab, "text.eos_token_id": args.vocab - 1, "embed_dim": args.width,
    })


def make_hf(args):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, max_position_embeddings=args.context, vocab_size=args.vocab,
                         eos_token_id=args.vocab - 1, hidden_act="gelu"),
        vision_config=dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, image_size=args.image, patch_size=args.patch, hidden_act="gelu"),
        projection_dim=args.width,
    )
    return CLIPModel(config)


def timed(fn, iterations):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, hf = make_vlmkit(args), make_hf(args)
    pixels = torch.randn(args.batch, 3, args.image, args.image)
    tokens = torch.randint(1, args.vocab - 2, (args.batch, args.context))
    tokens[:, 12] = args.vocab - 1  # end token; the rest is padding after it
    tokens[:, 13:] = 0
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in (("vlmkit", ours), ("hf", hf))}

    def train_ours():
        ours({"pixels": pixels, "tokens": tokens}).loss.backward()
        optimizers["vlmkit"].step()
        optimizers["vlmkit"].zero_grad(set_to_none=True)

    def train_hf():
        hf(input_ids=tokens, pixel_values=pixels, return_loss=True).loss.backward()
        optimizers["hf"].step()
        optimizers["hf"].zero_grad(set_to_none=True)

    @torch.inference_mode()
    def embed_ours():
        ours.encode_image(pixels)

    @torch.inference_mode()
    def embed_hf():
        hf.get_image_features(pixel_values=pixels)

    results = {key: [] for key in ("train_vlmkit", "train_hf", "embed_vlmkit", "embed_hf")}
    for _ in range(args.rounds):
        results["train_vlmkit"].append(args.batch / timed(train_ours, args.iterations))
        results["train_hf"].append(args.batch / timed(train_hf, args.iterations))
        ours.eval(), hf.eval()
        results["embed_vlmkit"].append(args.batch / timed(embed_ours, args.iterations * 3))
        results["embed_hf"].append(args.batch / timed(embed_hf, args.iterations * 3))
        ours.train(), hf.train()
    medians = {key: statistics.median(values) for key, values in results.items()}
    for key, value in medians.items():
        print(json.dumps({"measure": key, "per_s": round(value, 1), "rounds": [round(v, 1) for v in results[key]]}))
    print(json.dumps({
        "config": vars(args), "torch_threads": torch.get_num_threads(),
        "train_ratio_vs_hf": round(medians["train_vlmkit"] / medians["train_hf"], 3),
        "embed_ratio_vs_hf": round(medians["embed_vlmkit"] / medians["embed_hf"], 3),
    }))


if __name__ == "__main__":
    main()
