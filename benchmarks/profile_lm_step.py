"""Where an LM training step's time goes: torch.profiler tables (self CPU time) for vlmkit's `DecoderLM`
and HF `LlamaForCausalLM` at bench_llava.py's training configuration and weights, one thread.

Same step as bench_llava.py (b): forward, shifted cross-entropy, backward, AdamW, zero_grad. Prints one
table per side, sorted by self CPU time; read the op counts and the matmul / SDPA share, not the absolute
times (the two sides are profiled one after the other, so machine load can differ between them).
Under each table, the rate the step's matmuls (`aten::mm` / `addmm` / `bmm`, FLOPs from their shapes) ran at, next to a
2048^3 float32 matmul on the same thread: when the two agree, the matmuls are at this core's peak and
only the other ops are left to win time on.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_lm_step.py [--steps 3] [--rows 30]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
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
        with profile(record_shapes=True, with_flops=True) as prof:
            for _ in range(args.steps):
                step()
        print(f"===== {name}, {args.steps} steps")
        print_profile(name, prof, args.rows)


def print_profile(name: str, prof, rows: int) -> None:
    """The profile's table (self CPU time), then its matmuls' rate against this core's peak.

    `prof` must be recorded with `record_shapes=True, with_flops=True` (the FLOPs come from the shapes).
    """
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    mm = [event for event in events if event.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    flops, seconds = sum(e.flops for e in mm), sum(e.self_cpu_time_total for e in mm) / 1e6
    share = seconds / (sum(e.self_cpu_time_total for e in events) / 1e6)
    print(f"{name}: matmuls (mm, addmm, bmm) {flops / seconds / 1e9:.0f} GFLOP/s, {share:.0%} of the self CPU time; "
          f"a 2048^3 float32 matmul here: {peak_matmul_rate() / 1e9:.0f} GFLOP/s")


def peak_matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square float32 matmul on the current threads: this core's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
