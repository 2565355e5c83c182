"""Flamingo speed, side by side in one run: cached visual keys/values, and a training step vs HF IDEFICS.

A random HF `IdeficsForVisionText2Text` (CLIP-style ViT 64 px / patch 8 / width 128 / 2 layers, a
2-layer Perceiver Resampler with 16 latents, a Llama decoder width 256 / 4 layers with a gated
cross-attention layer before every 2nd) is saved and loaded into vlmkit's `flamingo` family through
`vlmkit.interop.hf_idefics`, so both sides hold the same weights (logit parity is
tests/interop/test_hf_idefics.py).

(a) Generation (vlmkit only): 4-shot VQA prompts (5 images a row), exactly `--new-tokens` new
    tokens (min = max), greedy, three ways: the KV cache with the visual keys/values of every gated
    block computed once (the default), the KV cache with the visual keys/values recomputed at every
    step (`model.cache_media_kv = False`), and no cache at all (`use_cache=False`).
(b) Training step: forward + loss + backward + AdamW step on the trainable parameters (resampler,
    gated blocks, the two added token rows; LM and vision tower frozen on both sides: IDEFICS's
    `freeze_text_layers`, `freeze_vision_layers`, `freeze_lm_head`) for the same ids, labels, pixels
    and image attention mask.

The contenders run in interleaved rounds, each on one thread (`torch.set_num_threads(1)`), so machine
noise hits both; medians of `--rounds` rounds are compared as ratios. Prints one JSON object on
stdout and a table on stderr.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_flamingo.py [--rounds 5] [--batch 4] [--new-tokens 24] [--profile 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import vlmkit

VOCAB = 512


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of exactly VOCAB ids (<unk> <s> </s>, then words w0 w1 ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{index}" for index in range(VOCAB - 3)]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 512}))


def hf_model(transformers):
    config = transformers.IdeficsConfig(
        vocab_size=VOCAB, additional_vocab_size=2, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=512, cross_layer_interval=2, use_resampler=True,
        freeze_text_layers=True, freeze_vision_layers=True, freeze_lm_head=True,
        vision_config={"embed_dim": 128, "image_size": 64, "patch_size": 8, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "intermediate_size": 512},
        perceiver_config={"use_resampler": True, "resampler_n_latents": 16, "resampler_depth": 2, "resampler_n_heads": 4,
                          "resampler_head_dim": 32})
    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(config)
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:  # open the gates, as after training
            layer.alpha_cross_attn.fill_(0.5)
            layer.alpha_dense.fill_(0.5)
    return model


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--train-tokens", type=int, default=96)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the rounds, profile STEPS training steps of each side (tables and matmul rate on stderr)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    hf = hf_model(transformers)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        write_tokenizer(Path(folder))
        ours = vlmkit.load(folder)
    generator = torch.Generator().manual_seed(0)

    # (a) generation: 4-shot prompts.
    ours.eval()
    pixels = torch.randn(args.batch, 3, 64, 64, generator=generator)
    shots = [[(torch.randn(3, 64, 64, generator=generator), f"w{3 * k} w{k + 1} w{k + 2}", f"w{k + 7}") for k in range(4)]
             for _ in range(args.batch)]
    questions = ["w5 w6 w7 w8"] * args.batch
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}

    def generate(cache_media: bool, use_cache: bool):
        ours.cache_media_kv = cache_media
        return ours.answer_in_context(pixels, questions, shots, use_cache=use_cache, **settings)

    reference = generate(True, True)
    assert generate(False, True) == reference == generate(True, False), "the three decoding paths disagree"
    times = {"cached_visual_kv": [], "recomputed_visual_kv": [], "no_cache": []}
    for _ in range(args.rounds):
        times["cached_visual_kv"].append(timed(lambda: generate(True, True)))
        times["recomputed_visual_kv"].append(timed(lambda: generate(False, True)))
        times["no_cache"].append(timed(lambda: generate(True, False)))
    ours.cache_media_kv = True

    # (b) a training step on the same batch: two images a row, IDEFICS's ids and mask.
    batch, length = args.batch, args.train_tokens
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    ids[:, 0] = 1
    ids[:, 1] = ours.config.media_token_id
    ids[:, length // 2] = ours.config.media_token_id
    train_pixels = torch.randn(batch, 2, 3, 64, 64, generator=generator)
    latest = (ids == ours.config.media_token_id).long().cumsum(dim=1)
    image_attention_mask = torch.nn.functional.one_hot(latest, num_classes=3)[:, :, 1:]
    labels = ids.masked_fill(ids == ours.config.media_token_id, -100)
    labels[:, 0] = -100
    ours.train()
    hf.train()
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    hf_params = [p for p in hf.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in hf_params), "different trainable parameter counts"
    ours_optimizer, hf_optimizer = torch.optim.AdamW(ours_params, lr=1e-4), torch.optim.AdamW(hf_params, lr=1e-4)

    def ours_step():
        loss = ours({"tokens": ids, "labels": labels, "pixels": train_pixels}).loss
        loss.backward()
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)

    def hf_step():
        # HF's own `labels=` loss views the logits as (-1, vocab_size) and fails with the added tokens'
        # columns, so both sides use the same shifted cross-entropy over all V + 2 logits.
        logits = hf(input_ids=ids, pixel_values=train_pixels, image_attention_mask=image_attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        hf_optimizer.step()
        hf_optimizer.zero_grad(set_to_none=True)

    ours_step(), hf_step()  # warm-up
    times["train_vlmkit"], times["train_hf"] = [], []
    for round_index in range(args.rounds):  # ABBA order: a drift in machine load hits both sides alike
        order = [("train_vlmkit", ours_step), ("train_hf", hf_step)]
        for key, step in order if round_index % 2 == 0 else order[::-1]:
            times[key].append(timed(step))

    if args.profile:
        from torch.profiler import profile

        from profile_lm_step import print_profile

        for name, step in (("vlmkit", ours_step), ("hf", hf_step)):
            with profile(record_shapes=True, with_flops=True) as prof:
                for _ in range(args.profile):
                    step()
            with contextlib.redirect_stdout(sys.stderr):
                print(f"===== {name}, {args.profile} training steps")
                print_profile(name, prof, rows=25)

    medians = {key: statistics.median(values) for key, values in times.items()}
    result = {
        "config": {"batch": args.batch, "new_tokens": args.new_tokens, "shots": 4, "train_tokens": length,
                   "rounds": args.rounds, "threads": 1, "torch": torch.__version__, "transformers": transformers.__version__},
        "median_s": {key: round(value, 4) for key, value in medians.items()},
        "generation_recomputed_over_cached_visual_kv": round(medians["recomputed_visual_kv"] / medians["cached_visual_kv"], 2),
        "generation_no_cache_over_cached": round(medians["no_cache"] / medians["cached_visual_kv"], 2),
        "train_step_hf_over_vlmkit": round(medians["train_hf"] / medians["train_vlmkit"], 2),
        "train_step_hf_over_vlmkit_best": round(min(times["train_hf"]) / min(times["train_vlmkit"]), 2),
    }
    for key, value in medians.items():
        print(f"{key:>22}: {value * 1000:8.1f} ms", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
