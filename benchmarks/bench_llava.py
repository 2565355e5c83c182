"""LLaVA generation and LM training speed: vlmkit vs HF transformers, side by side in one run.

(a) Generation: a random HF `LlavaForConditionalGeneration` (CLIP ViT 64 px / patch 8, Llama width
    256 / 4 layers / grouped-query attention) is saved and loaded into vlmkit through
    `vlmkit.interop.hf_llava`, so both sides hold the same weights. Both decode the same left-padded
    prompts (vicuna_v1 template, one image each) greedily with the KV cache, exactly `--new-tokens`
    new tokens (min = max, so no row stops early), image encoding included: vlmkit through its
    public `generate_output(pixels, prompt=...)` (one `<image>` placeholder per prompt, expanded by
    the model), HF through `generate(input_ids=..., pixel_values=...)` with the placeholders already
    expanded (what its processor gives).
(b) LM training step: vlmkit's `DecoderLM` vs HF `LlamaForCausalLM` at the same config and the same
    starting weights (HF's, loaded through `vlmkit.interop.hf_lm`): forward + the same shifted
    cross-entropy + backward + AdamW step on `--train-batch` x `--train-tokens` tokens, each side with the
    AdamW its trainer builds (vlmkit's `train.optim.make_optimizer`, HF Trainer's default `adamw_torch_fused`:
    both torch's fused kernel), or torch's unfused AdamW on both with `--same-optimizer`. `--bf16` runs
    both forwards under bf16 autocast (the loss stays float32), as both trainers do when asked for bf16.

The contenders run in interleaved rounds in one process, each side on one thread (set here:
`torch.set_num_threads(1)`), so machine noise hits both; the medians of `--rounds` rounds are
compared as ratios. Prints one JSON object on stdout and a table on stderr.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llava.py [--rounds 9] [--batch 8] [--new-tokens 32]

Where the time goes (torch.profiler, this configuration, one thread): generation is ~40% prompt
prefill (848 positions, compute-bound matmuls, the same on both sides), then 31 cached steps where
vlmkit spends ~3-4.5 ms and HF ~5.5-7 ms (HF copies grouped k/v for its masked SDPA and
concatenates its cache). The training step (benchmarks/profile_lm_step.py) is ~51% matmuls and
~10% SDPA forward/backward on both sides, the same kernels on the same FLOPs, the matmuls at this
core's float32 peak (the profile prints their rate against a 2048^3 matmul's); the rest (RMSNorm,
rotary, SwiGLU, residual adds, the loss, AdamW) is the same eager ops on both sides, and 1.2x would
need about half of them to vanish. Prints the best-of ratio too (`vlmkit_over_hf_best`).
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
import torch.nn.functional as F

import vlmkit

IMAGE_TOKEN = "<image>"


def write_tokenizer(folder: Path, vocab_size: int) -> int:
    """A word-level tokenizer of exactly `vocab_size` ids (<unk> <s> </s>, words, `<image>` last); returns the image id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{index}" for index in range(vocab_size - 4)]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<s>", "</s>", IMAGE_TOKEN])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 512}))
    return tokenizer.token_to_id(IMAGE_TOKEN)


def text_config(args) -> dict:
    return dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def make_llava(args, folder: Path):
    """(vlmkit llava, HF LlavaForConditionalGeneration) with the same random weights."""
    import transformers

    image_id = write_tokenizer(folder, args.vocab)
    vision = dict(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width, num_hidden_layers=args.vision_layers,
                  num_attention_heads=args.vision_width // 32, image_size=args.image, patch_size=args.patch)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text_config(args), image_token_index=image_id,
                                      image_seq_length=(args.image // args.patch) ** 2)
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(folder)
    return vlmkit.load(folder), hf


def make_lm(args, folder: Path):
    """(vlmkit lm family, HF LlamaForCausalLM) with the same random weights, in training mode."""
    import transformers

    torch.manual_seed(1)
    config = transformers.LlamaConfig(**{k: v for k, v in text_config(args).items() if k != "model_type"})
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(folder)
    return vlmkit.load(folder).train(), hf.train()


def prompt_texts(args) -> list[str]:
    """Questions of different lengths (rows are left-padded), words from the tokenizer's vocabulary."""
    generator = torch.Generator().manual_seed(2)
    lengths = [4 + (3 * row) % 13 for row in range(args.batch)]
    return [" ".join(f"w{int(t)}" for t in torch.randint(10, args.vocab - 10, (n,), generator=generator)) for n in lengths]


def hf_prompt(model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids vlmkit decodes after (its template, one placeholder), expanded and left-padded as HF's processor would."""
    from vlmkit.data.conversation import encode_prompt

    k, image_id = model.config.num_image_tokens, model.config.image_token_id
    rows = []
    for text in texts:
        ids = encode_prompt([{"from": "human", "value": text}], model.config.template, model.tokenizer, has_image=True)
        rows.append(ids.repeat_interleave(torch.where(ids == image_id, k, 1)))
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row):], attention_mask[index, width - len(row):] = row, 1
    return input_ids, attention_mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-tokens", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=2, help="training steps per round (the round's time is their mean)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--mlp", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--vision-width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--skip", choices=("generation", "training"), default=None, help="measure only the other part")
    parser.add_argument("--same-optimizer", action="store_true",
                        help="train both sides with torch's unfused AdamW instead of each library's trainer default")
    parser.add_argument("--bf16", action="store_true", help="training step forwards under bf16 autocast on both sides")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per side, the same for both
    n = args.new_tokens

    work = Path(tempfile.mkdtemp(prefix="bench_llava_"))
    contenders = {}
    check = {}
    if args.skip != "generation":
        (work / "llava").mkdir()
        ours, theirs = make_llava(args, work / "llava")
        texts = prompt_texts(args)
        pixels = torch.randn(args.batch, 3, args.image, args.image, generator=torch.Generator().manual_seed(3))
        input_ids, attention_mask = hf_prompt(ours, texts)
        settings = dict(max_new_tokens=n, min_new_tokens=n)

        def vlmkit_generate():
            return ours.generate_output(pixels, prompt=texts, **settings).tokens

        def hf_generate():
            with torch.no_grad():
                return theirs.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, do_sample=False,
                                       pad_token_id=0, **settings)[:, input_ids.shape[1]:]

        contenders["vlmkit_generate"], contenders["hf_generate"] = vlmkit_generate, hf_generate
        check["generate"] = (vlmkit_generate, hf_generate)

    if args.skip != "training":
        (work / "lm").mkdir()
        ours_lm, theirs_lm = make_lm(args, work / "lm")
        tokens = torch.randint(3, args.vocab, (args.train_batch, args.train_tokens + 1), generator=torch.Generator().manual_seed(4))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        if args.same_optimizer:  # torch's unfused AdamW on both sides
            optimizers = {"vlmkit": torch.optim.AdamW(ours_lm.lm.parameters(), lr=1e-4),
                          "hf": torch.optim.AdamW(theirs_lm.parameters(), lr=1e-4)}
        else:  # what each library's trainer builds: vlmkit's make_optimizer, HF Trainer's default (adamw_torch_fused)
            import transformers
            from vlmkit.train.optim import make_optimizer

            hf_args = transformers.TrainingArguments(output_dir=str(work / "hf_trainer"), learning_rate=1e-4, report_to=[])
            hf_class, hf_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(hf_args)
            optimizers = {"vlmkit": make_optimizer(ours_lm.lm, 1e-4, 0.0, (0.9, 0.999), 1e-8),
                          "hf": hf_class(theirs_lm.parameters(), **hf_kwargs)}

        precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

        def train_step(name, logits_fn):
            def step():
                for _ in range(args.train_steps):
                    with precision():
                        logits = logits_fn()  # (B, T, V)
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                    loss.backward()
                    optimizers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                return loss.detach()
            return step

        contenders["vlmkit_train"] = train_step("vlmkit", lambda: ours_lm.lm(inputs))
        contenders["hf_train"] = train_step("hf", lambda: theirs_lm(input_ids=inputs).logits)
        with torch.no_grad():  # same weights, same function: before any step the logits agree
            check["train_logits"] = float((ours_lm.lm(inputs) - theirs_lm(input_ids=inputs).logits).abs().max())

    agreement = {}
    if "generate" in check:
        mine, reference = (fn() for fn in check["generate"])
        assert mine.shape == reference.shape == (args.batch, n), (tuple(mine.shape), tuple(reference.shape))
        agreement["generated_tokens_equal"] = bool(torch.equal(mine, reference))
    if "train_logits" in check:
        agreement["train_logits_max_abs_diff"] = check["train_logits"]
    for fn in contenders.values():
        fn()  # warm-up (the generation functions already ran once above)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        order = list(contenders.items())
        for name, fn in order if round_ % 2 == 0 else order[::-1]:  # ABBA: a drift in machine load hits both sides alike
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed / (args.train_steps if name.endswith("_train") else 1))
    median = {name: statistics.median(values) for name, values in times.items()}
    result: dict = {"threads_per_side": 1, "rounds": args.rounds, "agreement": agreement, "median_seconds": {k: round(v, 4) for k, v in median.items()}}
    table = [("measure", "vlmkit", "HF", "vlmkit / HF")]
    if "vlmkit_generate" in median:
        rate = {side: args.batch * n / median[f"{side}_generate"] for side in ("vlmkit", "hf")}
        result["generation"] = {"batch": args.batch, "new_tokens": n, "prompt_positions": int(input_ids.shape[1]),
                                "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
                                "vlmkit_over_hf": round(rate["vlmkit"] / rate["hf"], 3)}
        table.append(("generation tokens/s", f"{rate['vlmkit']:.1f}", f"{rate['hf']:.1f}", f"{rate['vlmkit'] / rate['hf']:.2f}x"))
    if "vlmkit_train" in median:
        rate = {side: 1.0 / median[f"{side}_train"] for side in ("vlmkit", "hf")}
        result["training"] = {"batch": args.train_batch, "tokens": args.train_tokens,
                              "steps_per_s": {k: round(v, 3) for k, v in rate.items()},
                              "vlmkit_over_hf": round(rate["vlmkit"] / rate["hf"], 3),
                              "vlmkit_over_hf_best": round(min(times["hf_train"]) / min(times["vlmkit_train"]), 3)}
        table.append(("LM train steps/s", f"{rate['vlmkit']:.3f}", f"{rate['hf']:.3f}", f"{rate['vlmkit'] / rate['hf']:.2f}x"))
    result["config"] = {key: value for key, value in vars(args).items() if key not in ("skip",)}
    for row in table:
        print(f"{row[0]:<22}{row[1]:>12}{row[2]:>12}{row[3]:>14}", file=sys.stderr)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
