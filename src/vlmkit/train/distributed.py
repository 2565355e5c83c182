"""Process-group set-up for torchrun, and the identity when run as one plain process.

Model code never assumes a process group: the trainer calls `setup()`, which initialises one
only when torchrun's environment says so (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() created the process group (and teardown() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistInfo:
    """The process's place in the torchrun job; initialises the process group when torchrun started
    several processes and nobody (e.g. a caller training several models in one job) did it yet."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    return DistInfo(rank, world_size, local_rank, device, owns_group)


def teardown(info: DistInfo) -> None:
    """Destroy the process group if `setup` created it (a caller's own group is left to the caller)."""
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


def mean_logs_across_ranks(rows: list[dict[str, float]], info: DistInfo) -> list[dict[str, float]]:
    """Per-step log dicts averaged over the ranks (one collective for all the rows).

    A key a rank did not log at a step (a micro-batch with no questions has no `vqa_loss`) is
    averaged over the ranks that did.
    """
    if not info.enabled:
        return rows
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, rows)
    averaged = []
    for step_rows in zip(*gathered):
        keys = dict.fromkeys(key for row in step_rows for key in row)
        averaged.append({key: sum(row[key] for row in step_rows if key in row) / sum(key in row for row in step_rows)
                         for key in keys})
    return averaged
