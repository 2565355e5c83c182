"""Everything that wraps a model for training, applied in one place and in one order (as torchtitan does).

Model code is written for one device; `parallelize` turns it into what the training loop calls:
1. activation checkpointing: every stack that supports it (`gradient_checkpointing` attribute)
   recomputes its blocks in the backward pass;
2. data parallelism across the torchrun processes, one of
   - FSDP (`fsdp: true`): FSDP2's `fully_shard` on every `TransformerBlock`, then on the root for
     the rest (embeddings, CNN towers, heads), so each rank holds 1/N of the parameters, gradients
     and optimizer state and gathers one block at a time; with bf16 the gathered parameters are
     bf16 and gradients are reduced in fp32, except BatchNorm's (a conv stem, a ResNet tower): each
     BatchNorm is its own FSDP unit kept in fp32, as its running statistics are. Frozen (locked) parameters are sharded too and get no
     gradients. FSDP2 cannot shard 0-dim parameters (CLIP's logit scale, SigLIP's bias): those stay
     whole on every rank and a hook averages their gradients across ranks, as DDP would. A family
     whose steps can leave a head without gradients (`uses_every_parameter = False`) reduces zeros
     for it, so every rank joins the same collectives (AdamW then decays such a weight that step);
   - DistributedDataParallel otherwise; a family whose steps can leave a head without gradients
     gets DDP's search for unused parameters, so a micro-batch without, say, any statement never
     hangs the gradient all-reduce;
3. `torch.compile` of the result (DDP's optimizer splits the graph at bucket boundaries).
The model itself keeps its own parameter names: optimizers, checkpoints and logs use it, never
the wrapper. Under FSDP the parameters become sharded DTensors, so the optimizer is built after
`parallelize`, and checkpoints go through `full_model_state` / `full_optimizer_state` (gathered
on rank 0, in the same format as without FSDP) and back through `load_optimizer_state`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vlmkit.errors import UserError
from vlmkit.train.distributed import DistInfo
from vlmkit.train.recipe import Recipe


def uses_bf16(recipe: Recipe, device: torch.device) -> bool:
    """bf16 autocast: asked for, or `auto` on a GPU."""
    return recipe.precision == "bf16" or (recipe.precision == "auto" and device.type == "cuda")


def is_sharded(recipe: Recipe, info: DistInfo) -> bool:
    """FSDP is on: asked for and more than one process (one process has nothing to shard over)."""
    return recipe.fsdp and info.enabled


def parallelize(model: nn.Module, recipe: Recipe, info: DistInfo) -> nn.Module:
    """The module the training loop calls: `model` with checkpointing, FSDP or DDP, and compile applied as the recipe asks."""
    if recipe.gradient_checkpointing:
        stacks = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
        if not stacks:
            raise UserError(f"the '{model.family}' family has no transformer stack to checkpoint; drop gradient_checkpointing")
        for module in stacks:
            module.gradient_checkpointing = True
    trained = model
    if is_sharded(recipe, info):
        shard(model, bf16=uses_bf16(recipe, info.device), every_step_uses_every_parameter=getattr(model, "uses_every_parameter", False))
    elif info.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=not getattr(model, "uses_every_parameter", False),
        )
    if recipe.compile:
        trained = torch.compile(trained)
    return trained


def _average_gradient_across_ranks(parameter: torch.Tensor) -> None:
    # The part accumulated by earlier micro-batches is already the same on every rank, so
    # averaging again after each one leaves it as it is and averages the new part.
    dist.all_reduce(parameter.grad)
    parameter.grad.div_(dist.get_world_size())


def shard(model: nn.Module, bf16: bool = False, every_step_uses_every_parameter: bool = True) -> None:
    """FSDP2 in place over the default process group: each `TransformerBlock`, then the root (see the module
    docstring). `every_step_uses_every_parameter=False` makes parameters a step left without gradients
    reduce zeros, so the ranks' collectives always match."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from vlmkit.layers.transformer import TransformerBlock

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    scalars = {parameter for parameter in model.parameters() if parameter.ndim == 0}
    for parameter in scalars:
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(_average_gradient_across_ranks)
    if bf16:  # BatchNorm's kernels take parameters of their running statistics' dtype: fp32 in, fp32 out
        batch_norm_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                fully_shard(module, mp_policy=batch_norm_policy, ignored_params=scalars)
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, mp_policy=policy, ignored_params=scalars)
    # The root's parameters are needed again right at the start of the backward pass: keep them gathered.
    fully_shard(model, mp_policy=policy, ignored_params=scalars, reshard_after_forward=False)
    if not every_step_uses_every_parameter:
        model.set_reduce_scatter_unused_params(True)


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Whole tensors, gathered to rank 0 on the CPU (the other ranks get {}): the format of an unsharded save.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's state dict as one process has it: under FSDP gathered on rank 0 (a collective every
    rank must call; the others get {}), else `model.state_dict()`."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_dict_options())


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters' names in its own order (the integer ids of `optimizer.state_dict()`)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """`optimizer.state_dict()` as one process has it (integer parameter ids, whole tensors): under FSDP
    gathered on rank 0 (a collective every rank must call; the others get {})."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_state_dict_options())
    if not by_name:
        return {}
    ids = {name: index for index, name in enumerate(_parameter_names(model, optimizer))}
    # The groups' hyperparameters from the optimizer itself, as `Optimizer.state_dict` writes them.
    groups, start = [], 0
    for group in optimizer.param_groups:
        groups.append({**{key: value for key, value in group.items() if key != "params"},
                       "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": {ids[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Load what `full_optimizer_state` saved (every rank passes the whole state; FSDP keeps each its shard)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[index] for index in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):  # hyperparameters exactly as saved
        group.update({key: value for key, value in saved.items() if key != "params"})
