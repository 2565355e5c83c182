"""Run under torchrun by test_distributed.py: every family trains two steps in one two-process job.

The process group is created here, once, and shared by the trainings (the trainer leaves a group
it did not create alone), so one launch covers every family.
Usage: torchrun --nproc_per_node 2 ddp_every_family.py DATA OUT RECIPE [RECIPE ...]
"""
import sys

import torch.distributed as dist

from vlmkit.train.recipe import load_recipe
from vlmkit.train.trainer import Trainer


def main(data: str, out: str, recipes: list[str]) -> None:
    dist.init_process_group("gloo")
    for name in recipes:
        # From scratch: a recipe's pretrained towers (init_text: runs/lm-tiny) are runs of this machine.
        recipe = load_recipe(name, {"steps": 2, "batch_size": 8, "warmup_steps": 1, "save_every": 2, "log_every": 1,
                                    "init_text": None, "init_image": None})
        Trainer(recipe, data, f"{out}/{name}").train()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
