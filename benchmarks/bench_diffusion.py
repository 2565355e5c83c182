"""Diffusion sampling speed: DDIM with few steps vs DDPM's full schedule, same U-Net, same prompts.

Both sides are one GLIDE model (a run folder with --model, or a randomly initialised glide-tiny with
a tokenizer trained on a few captions: speed does not depend on the weights) sampling `--batch`
images with classifier-free guidance (two U-Net rows per image per step). DDPM walks all T training
steps (GLIDE's `diffusion_steps`, 1000 by default; `--ddpm-steps` to shorten it on a slow machine:
the per-step cost is the same, so images/s scales as 1 / steps), DDIM walks `--ddim-steps`. The two
run in alternating rounds in one process so machine noise hits both; read the ratio. Prints one
JSON line per measurement and a summary line.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_diffusion.py [--ddim-steps 50] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import vlmkit

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "an orange circle", "a purple square"]


def make_model(path: str | None):
    if path:
        return vlmkit.load(path)
    from vlmkit.config import apply_overrides
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.registry import get_family, named_config
    from vlmkit.tokenizers import train_clip_bpe

    tokenizer = train_clip_bpe(PROMPTS * 4, vocab_size=600, context_length=32)
    family, config = named_config("glide-tiny")
    cls = get_family(family)
    torch.manual_seed(0)
    model = cls.from_config_dict(apply_overrides(cls.adapt_config_to_tokenizer(config, tokenizer), {}))
    model.tokenizer, model.transform = tokenizer, ImageTransform(model.config.unet.image_size)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a GLIDE run folder (default: a random glide-tiny)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--ddpm-steps", type=int, default=None, help="default: the model's diffusion_steps (the full schedule)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = make_model(args.model)
    ddpm_steps = args.ddpm_steps or model.config.diffusion_steps
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    sides = {
        f"ddim-{args.ddim_steps}": {"sampler": "ddim", "steps": args.ddim_steps},
        f"ddpm-{ddpm_steps}": {"sampler": "ddpm", "steps": ddpm_steps},
    }
    model.imagine(prompts[:1], steps=2, guidance=args.guidance)  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        for name, options in sides.items():
            start = time.perf_counter()
            model.imagine(prompts, seed=round_index, guidance=args.guidance, **options)
            seconds = time.perf_counter() - start
            speeds[name].append(args.batch / seconds)
            print(json.dumps({"round": round_index, "side": name, "images_per_s": round(args.batch / seconds, 4),
                              "seconds": round(seconds, 3)}), flush=True)
    ddim, ddpm = (statistics.median(speeds[name]) for name in sides)
    print(json.dumps({"summary": True, "ddim_steps": args.ddim_steps, "ddpm_steps": ddpm_steps, "batch": args.batch,
                      "guidance": args.guidance, "ddim_images_per_s": round(ddim, 4), "ddpm_images_per_s": round(ddpm, 4),
                      "speedup": round(ddim / ddpm, 2), "step_cost_ratio": round((ddim / ddpm) * args.ddim_steps / ddpm_steps, 3)}))


if __name__ == "__main__":
    main()
