"""LoRA: low-rank adapters on `nn.Linear` layers, including slices of fused projections.

A LoRA layer computes `W x + b + (alpha / rank) * B A dropout(x)` with A (rank, in) initialised
Kaiming-uniform and B (out, rank) zeros, so a freshly adapted model gives its base outputs (as in
PEFT). A fused projection (QKV in one matrix, gate and up in one) can be adapted on some of its
output slices only: each slice gets its own A and B, and its delta lands on its own rows of the
output, which is exactly PEFT's LoRA on the separate `q_proj` / `v_proj` of the unfused model.

Target spec (`apply_lora(model, targets=[...])`), one string per target:

    PATTERN              LoRA on the whole output of every nn.Linear that PATTERN names
    PATTERN:s1,s2        LoRA on the named output slices only, e.g. "attn.qkv:q,v", "mlp.fc1:gate,up"

PATTERN names module paths (`model.named_modules()`) as PEFT's `target_modules` do: a path that
equals it or ends with "." + PATTERN ("qkv" names every `...attn.qkv`), with `*` and `?` globbing
across dots ("text.*.qkv", "blocks.1?.mlp.fc1"). Slice names come from the layer's `lora_slices`
attribute, {name: (start, stop)} over the output features (set it with `declare_slices`; a
grouped-query QKV must), or else from its name: a layer called `qkv` splits into equal q, k, v
thirds and one called `kv` into equal k, v halves (the layout of `layers.attention.Attention`).

The base weight and bias keep their names (`attn.qkv.weight`), so checkpoints and the interop
mappings see the model they always saw; the adapters live beside them as
`attn.qkv.lora_A.<slice>.weight` / `lora_B.<slice>.weight`, slice "all" for a whole layer.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import UserError

WHOLE = "all"  # the slice name of a LoRA on a layer's whole output
# Layouts known by a layer's name: (slice names, in output order, of equal size).
DEFAULT_LAYOUTS = {"qkv": ("q", "k", "v"), "kv": ("k", "v")}


def declare_slices(linear: nn.Linear, **sizes: int) -> None:
    """Name the output slices of a fused projection in order, e.g. `declare_slices(qkv, q=512, k=128, v=128)`;
    LoRA targets such as "qkv:q,v" then find their rows (sizes must add up to the output features)."""
    if sum(sizes.values()) != linear.out_features:
        raise ValueError(f"slice sizes {sizes} add up to {sum(sizes.values())}, not the layer's {linear.out_features} outputs")
    start, slices = 0, {}
    for name, size in sizes.items():
        slices[name] = (start, start + size)
        start += size
    linear.lora_slices = slices


def layer_slices(path: str, linear: nn.Linear) -> dict[str, tuple[int, int]]:
    """{slice name: (start, stop)} of a layer's output: its declared `lora_slices`, its name's default
    layout, or none; the whole output is always slice "all"."""
    declared = getattr(linear, "lora_slices", None)
    if declared is None:
        names = DEFAULT_LAYOUTS.get(path.rsplit(".", 1)[-1])
        declared = {}
        if names and linear.out_features % len(names) == 0:
            size = linear.out_features // len(names)
            declared = {name: (index * size, (index + 1) * size) for index, name in enumerate(names)}
    return {WHOLE: (0, linear.out_features), **declared}


class LoRALinear(nn.Linear):
    """An `nn.Linear` (same `weight` and `bias`, same keys) plus LoRA deltas on slices of its output."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # the base layer's own tensors are adopted, not re-created
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        if hasattr(base, "lora_slices"):  # a declared fused layout stays with the layer (and its merge)
            self.lora_slices = base.lora_slices
        self.slices = dict(sorted(slices.items(), key=lambda item: item[1]))
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout_p = dropout
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ModuleDict({name: nn.Linear(self.in_features, rank, bias=False, **factory) for name in self.slices})
        self.lora_B = nn.ModuleDict({name: nn.Linear(rank, stop - start, bias=False, **factory)
                                     for name, (start, stop) in self.slices.items()})
        self.reset_lora()

    def reset_lora(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5), nn.Linear's default), B zeros."""
        for name in self.slices:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self) -> torch.Tensor:
        """The full (out, in) weight change the adapters make: scale * B A on each slice's rows."""
        delta = torch.zeros_like(self.weight)
        for name, (start, stop) in self.slices.items():
            delta[start:stop] += self.scale * (self.lora_B[name].weight @ self.lora_A[name].weight)
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        h = self.lora_dropout(x)  # (..., in)
        # One (..., out) update: each slice's delta at its rows, zeros between (no in-place writes).
        pieces, position = [], 0
        for name, (start, stop) in self.slices.items():
            if start > position:
                pieces.append(out.new_zeros(*out.shape[:-1], start - position))
            pieces.append(self.lora_B[name](self.lora_A[name](h)) * self.scale)  # (..., stop - start)
            position = stop
        if position < self.out_features:
            pieces.append(out.new_zeros(*out.shape[:-1], self.out_features - position))
        return out + torch.cat(pieces, dim=-1)  # (..., out)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's base tensors with the deltas folded in."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        linear.weight, linear.bias = self.weight, self.bias
        if hasattr(self, "lora_slices"):
            linear.lora_slices = self.lora_slices
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_alpha={self.alpha}, slices={list(self.slices)}"


def parse_target(spec: str) -> tuple[str, tuple[str, ...]]:
    """"attn.qkv:q,v" -> ("attn.qkv", ("q", "v")); "attn.out" -> ("attn.out", ("all",))."""
    pattern, _, names = spec.partition(":")
    slices = tuple(name.strip() for name in names.split(",")) if names else (WHOLE,)
    if not pattern.strip() or not all(slices):
        raise UserError(f"LoRA target {spec!r} is not PATTERN or PATTERN:slice,slice (e.g. 'attn.qkv:q,v')")
    return pattern.strip(), slices


def matches(path: str, pattern: str) -> bool:
    """PEFT's suffix rule with globbing: the path is the pattern, or ends with "." + the pattern."""
    return fnmatchcase(path, pattern) or fnmatchcase(path, "*." + pattern)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _plan(model: nn.Module, targets: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{module path: slice names} for every nn.Linear the targets name, checked against the layers' layouts."""
    linears = {path: module for path, module in model.named_modules() if isinstance(module, nn.Linear) and path}
    plan: dict[str, tuple[str, ...]] = {}
    for spec in targets:
        pattern, names = parse_target(spec)
        found = [path for path in linears if matches(path, pattern)]
        if not found:
            raise UserError(f"LoRA target {spec!r} names no nn.Linear of the model; linear layers are named like "
                            f"{', '.join(list(linears)[:4])}")
        for path in found:
            known = layer_slices(path, linears[path])
            unknown = [name for name in names if name not in known]
            if unknown:
                raise UserError(f"LoRA target {spec!r}: layer {path} has no slice {', '.join(unknown)} "
                                f"(its slices: {', '.join(known)}; a fused layer declares them with declare_slices)")
            plan[path] = tuple(dict.fromkeys(plan.get(path, ()) + names))
    return plan


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRALinear} of every adapted layer of `model`."""
    return {path: module for path, module in model.named_modules() if isinstance(module, LoRALinear)}


def apply_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    trainable: Sequence[str] = (),
) -> nn.Module:
    """Wrap the layers `targets` name (see the module docstring for the spec) in LoRA adapters, in place,
    and freeze every other parameter except those `trainable` names (same patterns, over parameter or
    module paths: e.g. a projector trained in full beside the adapted LM). Returns `model`; the base tensors keep their
    names. Adapting a layer twice is an error (merge first)."""
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise UserError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1); got rank={rank}, alpha={alpha}, dropout={dropout}")
    if isinstance(targets, str):
        targets = [targets]
    if already := list(lora_layers(model)):
        raise UserError(f"the model already has LoRA adapters ({already[0]}, ...); merge_lora it before adapting again")
    adapt_layers(model, _plan(model, targets), rank, alpha, dropout)
    for name, parameter in model.named_parameters():
        # A `trainable` pattern names a parameter ("logit_scale") or a module above it ("projector").
        parts = name.split(".")
        owners = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name
                                 or any(matches(owner, pattern) for owner in owners for pattern in trainable))
    return model


def adapt_layers(model: nn.Module, plan: dict[str, Sequence[str]], rank: int, alpha: float, dropout: float = 0.0) -> None:
    """Wrap exactly the layers `plan` names, {module path: slice names}, in LoRA adapters (no pattern
    matching, no freezing): what `apply_lora` and adapter loaders build on."""
    for path, names in plan.items():
        base = model.get_submodule(path)
        if isinstance(base, LoRALinear) or not isinstance(base, nn.Linear):
            raise UserError(f"{path} is not a plain nn.Linear (it is {type(base).__name__}); LoRA adapts linear layers once")
        spans = layer_slices(path, base)
        unknown = [name for name in names if name not in spans]
        if unknown:
            raise UserError(f"layer {path} has no slice {', '.join(unknown)} (its slices: {', '.join(spans)})")
        chosen = sorted(spans[name] for name in names)
        if any(previous[1] > current[0] for previous, current in zip(chosen, chosen[1:])):
            raise UserError(f"LoRA slices {', '.join(names)} of {path} overlap; adapt the whole layer or disjoint slices")
        _set_submodule(model, path, LoRALinear(base, {name: spans[name] for name in names}, rank, alpha, dropout))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back, in place: the merged
    model gives the same outputs and has exactly the keys of the model before `apply_lora`."""
    for path, layer in lora_layers(model).items():
        _set_submodule(model, path, layer.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only, under the model's own keys (`...attn.qkv.lora_A.q.weight`)."""
    return {key: value for key, value in model.state_dict().items() if ".lora_A." in key or ".lora_B." in key}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "LoRA weights") -> None:
    """Copy adapter tensors into an adapted model; every adapter key must be given, and only those."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = sorted(f"{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
                        for key in set(expected) & set(state) if state[key].shape != expected[key].shape)
    if missing or unexpected or mismatched:
        from vlmkit.io import key_mismatch_error

        raise key_mismatch_error(source, "LoRA adapters", missing, unexpected, mismatched)
    with torch.no_grad():
        for key, value in state.items():
            model.get_parameter(key).copy_(value)
