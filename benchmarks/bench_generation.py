"""Generation speed: vlmkit cached vs uncached decoding, and vs HF transformers' `generate`.

Both sides are the same randomly initialised encoder-decoder: a ViT image encoder and a GPT-2
style decoder with cross-attention in every block (vlmkit: VirTex with a ViT tower and
DecoderLM; HF: VisionEncoderDecoderModel(ViTModel, GPT2LMHeadModel)). Greedy decoding of
exactly `--new-tokens` tokens (min = max, so no row stops early), image encoding included.
The contenders run in alternating rounds in one process so machine noise hits all of them;
read the ratios. Prints one JSON line per measurement and a summary line.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_generation.py [--batch 8] [--new-tokens 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import vlmkit
from vlmkit.generation import generate
from vlmkit.tokenizers import train_clip_bpe


def make_vlmkit(args, tokenizer):
    model = vlmkit.create_model("virtex-tiny", **{
        "vision": {"type": "vit", "image_size": args.image, "patch_size": args.patch, "width": args.width,
                   "depth": args.layers, "heads": args.heads},
        "text.width": args.width, "text.depth": args.layers, "text.heads": args.heads,
        "text.context_length": args.context, "text.vocab_size": tokenizer.vocab_size,
        "text.eos_token_id": tokenizer.eos_id, "text.pad_token_id": tokenizer.pad_id, "label_smoothing": 0.0,
    })
    model.tokenizer = tokenizer
    return model.eval()


def make_hf(args, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel, VisionEncoderDecoderModel

    encoder = ViTModel(ViTConfig(hidden_size=args.width, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 intermediate_size=4 * args.width, image_size=args.image, patch_size=args.patch),
                       add_pooling_layer=False)
    decoder = GPT2LMHeadModel(GPT2Config(n_embd=args.width, n_layer=args.layers, n_head=args.heads, n_positions=args.context,
                                         vocab_size=tokenizer.vocab_size, add_cross_attention=True,
                                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = tokenizer.bos_id
    model.config.pad_token_id = tokenizer.pad_id
    model.config.eos_token_id = tokenizer.eos_id
    model.generation_config.decoder_start_token_id = tokenizer.bos_id
    model.generation_config.pad_token_id = tokenizer.pad_id
    model.generation_config.eos_token_id = tokenizer.eos_id
    return model.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)  # small decoding ops: 1 thread avoids OpenMP barrier stalls on a shared CPU
    args = parser.parse_args()
    args.context = args.new_tokens + 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = train_clip_bpe(["a red circle on the left", "two blue squares"], vocab_size=600, context_length=args.context)
    ours, theirs = make_vlmkit(args, tokenizer), make_hf(args, tokenizer)
    pixels = torch.randn(args.batch, 3, args.image, args.image)
    n = args.new_tokens
    settings = dict(max_new_tokens=n, min_new_tokens=n, num_beams=args.beams)

    def run_ours(use_cache):
        def fn():
            with torch.no_grad():
                step, prompt = ours.decoding_setup(pixels, None)
                return generate(step, prompt, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, use_cache=use_cache, **settings).tokens
        return fn

    def run_hf(use_cache):
        def fn():
            with torch.no_grad():
                return theirs.generate(pixel_values=pixels, do_sample=False, use_cache=use_cache, **settings)[:, 1:]
        return fn

    contenders = {"vlmkit_cached": run_ours(True), "vlmkit_uncached": run_ours(False), "hf_cached": run_hf(True), "hf_uncached": run_hf(False)}
    for fn in contenders.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            tokens = fn()
            elapsed = time.perf_counter() - start
            assert tokens.shape == (args.batch, n), (name, tuple(tokens.shape))
            times[name].append(elapsed)
            print(json.dumps({"round": round_, "contender": name, "seconds": round(elapsed, 4),
                              "tokens_per_s": round(args.batch * n / elapsed, 1)}), flush=True)
    rate = {name: args.batch * n / statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "summary": True, "batch": args.batch, "new_tokens": n, "beams": args.beams, "width": args.width, "layers": args.layers,
        "threads": args.threads,
        "tokens_per_s": {name: round(value, 1) for name, value in rate.items()},
        "cached_over_uncached": round(rate["vlmkit_cached"] / rate["vlmkit_uncached"], 2),
        "vlmkit_over_hf_cached": round(rate["vlmkit_cached"] / rate["hf_cached"], 2),
        "hf_cached_over_hf_uncached": round(rate["hf_cached"] / rate["hf_uncached"], 2),
        "parameters": {"vlmkit": sum(p.numel() for p in ours.parameters()), "hf": sum(p.numel() for p in theirs.parameters())},
    }), flush=True)


if __name__ == "__main__":
    main()
