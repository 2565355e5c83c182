"""Everything that wraps a model for training, applied in one place and in one order (as torchtitan does).

Model code is written for one device; `parallelize` turns it into what the training loop calls:
1. activation checkpointing: every stack that supports it (`gradient_checkpointing` attribute)
   recomputes its blocks in the backward pass;
2. data parallelism: DistributedDataParallel across the torchrun processes (FSDP would go here);
   a family whose steps can leave a head without gradients (`uses_every_parameter = False`) gets
   DDP's search for unused parameters, so a micro-batch without, say, any statement never hangs
   the gradient all-reduce;
3. `torch.compile` of the result (DDP's optimizer splits the graph at bucket boundaries).
The model itself keeps its own parameter names: optimizers, checkpoints and logs use it, never
the wrapper.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.errors import UserError
from vlmkit.train.distributed import DistInfo
from vlmkit.train.recipe import Recipe


def parallelize(model: nn.Module, recipe: Recipe, info: DistInfo) -> nn.Module:
    """The module the training loop calls: `model` with checkpointing, DDP and compile applied as the recipe asks."""
    if recipe.gradient_checkpointing:
        stacks = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
        if not stacks:
            raise UserError(f"the '{model.family}' family has no transformer stack to checkpoint; drop gradient_checkpointing")
        for module in stacks:
            module.gradient_checkpointing = True
    trained = model
    if info.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=not getattr(model, "uses_every_parameter", False),
        )
    if recipe.compile:
        trained = torch.compile(trained)
    return trained
