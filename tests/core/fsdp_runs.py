"""Run under torchrun by test_fsdp.py: the FSDP trainings of that test in one two-process job.

1. `fsdp` (fp32, gradient checkpointing, locked image tower): 4 steps, checkpoints at 2 and 4;
2. `fsdp` resumed from its step-2 checkpoint (rank 0 points checkpoints/latest back at it), which
   must redo steps 3 and 4 exactly;
3. `fsdp-bf16`: 2 steps with bf16 autocast and FSDP's bf16 mixed-precision policy;
4. `fsdp-bf16-stem`: 1 step of the same with the recipe's conv stem (BatchNorm) put back.
Usage: torchrun --nproc_per_node 2 fsdp_runs.py DATA OUT KEY=VALUE ...
"""
import shutil
import sys

import torch.distributed as dist

from vlmkit.train.recipe import load_recipe, parse_overrides
from vlmkit.train.trainer import Trainer


def main(data: str, out: str, overrides: list[str]) -> None:
    dist.init_process_group("gloo")
    common = {**parse_overrides(overrides), "fsdp": True}
    Trainer(load_recipe("clip-vit-tiny", common), data, f"{out}/fsdp").train()
    if dist.get_rank() == 0:
        shutil.copytree(f"{out}/fsdp", f"{out}/fsdp-first")  # the uninterrupted run, kept for the comparison
        (open(f"{out}/fsdp/checkpoints/latest", "w")).write("step-0000002")
    dist.barrier()
    Trainer(load_recipe("clip-vit-tiny", common), data, f"{out}/fsdp", resume=True).train()
    bf16 = {**common, "steps": 2, "save_every": 2, "precision": "bf16"}
    Trainer(load_recipe("clip-vit-tiny", bf16), data, f"{out}/fsdp-bf16").train()
    stem = {key: value for key, value in bf16.items() if key != "model.vision.conv_stem"} | {"steps": 1, "save_every": 1}
    Trainer(load_recipe("clip-vit-tiny", stem), data, f"{out}/fsdp-bf16-stem").train()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
