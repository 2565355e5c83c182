"""Where an LM training step's time goes: torch.profiler tables (self CPU time) for vlmkit's `DecoderLM`
and HF `LlamaForCausalLM` at bench_llava.py's training configuration and weights, one thread.

Same step as bench_llava.py (b): forward, shifted cross-entropy, backward, AdamW, zero_grad. Prints one
table per side, sorted by self CPU time; read the op counts and the matmul / SDPA share, not the absolute
times (the two sides are profiled one after the other, so machine load can differ between them).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_lm_step.py [--steps 3] [--rows 30]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).parent))
import bench_llava  # noqa: E402  (the benchmark's model builders, so both scripts measure the same models)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = argparse.Namespace(vocab=1024, width=256, mlp=688, layers=4, heads=8, kv_heads=4)
    ours, hf = bench_llava.make_lm(config, Path(tempfile.mkdtemp(prefix="profile_lm_")))
    tokens = torch.randint(3, config.vocab, (8, 129), generator=torch.Generator().manual_seed(4))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
    sides = {"vlmkit": (ours.lm, lambda: ours.lm(inputs)), "hf": (hf, lambda: hf(input_ids=inputs).logits)}
    for name, (model, logits_fn) in sides.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            loss = F.cross_entropy(logits_fn().flatten(0, 1).float(), targets.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(), step()  # warm-up: optimizer state, allocator
        with profile() as prof:
            for _ in range(args.steps):
                step()
        print(f"===== {name}, {args.steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
