"""Key mapping between vlmkit's parameter names and a foreign checkpoint's, in both directions.

Every format (HF CLIP, OpenCLIP/OpenAI, BERT) is described as a list of `Rule`s generated from the
model's shape: one vlmkit tensor <- one or more foreign tensors (a fused QKV from three
projections, a transposed projection, a renamed norm). The same rules convert a foreign state dict
into vlmkit's (`to_ours`, strict: every foreign key used, every rule satisfied, every shape right)
and back (`to_theirs`, for export), so no format carries its own copy of the loading logic.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from vlmkit.errors import UserError
from vlmkit.io import key_mismatch_error, name_listing


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _single(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


@dataclass(frozen=True)
class Rule:
    """One vlmkit tensor `ours` made from the foreign tensors `theirs` (and split back for export)."""

    ours: str
    theirs: tuple[str, ...]
    join: Callable[..., torch.Tensor] = _identity  # foreign tensors -> ours
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _single  # ours -> foreign tensors


def rename(ours: str, theirs: str) -> Rule:
    """The same tensor under another name."""
    return Rule(ours, (theirs,))


def transposed(ours: str, theirs: str) -> Rule:
    """A projection stored as `x @ W` (OpenAI's `proj`, `text_projection`) for our `nn.Linear` (`x @ W.T`)."""
    return Rule(ours, (theirs,), join=lambda w: w.T.contiguous(), split=lambda w: (w.T.contiguous(),))


def module(ours: str, theirs: str, names: Iterable[str] = ("weight", "bias")) -> list[Rule]:
    """A module's parameters renamed one to one (a Linear or LayerNorm under another prefix)."""
    return [rename(f"{ours}.{name}", f"{theirs}.{name}") for name in names]


def fused(ours: str, parts: tuple[str, ...], sizes: tuple[int, ...] | None = None) -> Rule:
    """Our fused tensor (QKV rows [q; k; v]) from separate foreign projections, concatenated on dim 0.

    `sizes` are the parts' rows when they differ (grouped-query attention's smaller k and v);
    without them the parts are equal.
    """
    count = len(parts)
    if sizes is None:
        return Rule(ours, parts, join=lambda *tensors: torch.cat(tensors, dim=0), split=lambda t: tuple(t.chunk(count, dim=0)))
    return Rule(ours, parts, join=lambda *tensors: torch.cat(tensors, dim=0), split=lambda t: tuple(t.split(list(sizes), dim=0)))


@dataclass(frozen=True)
class BlockNames:
    """Where a format keeps the pieces of one transformer block, relative to the block's prefix.

    `qkv` is one fused projection prefix (`attn.in_proj_` style, weight/bias appended as
    `{qkv}weight`) or three separate Linear prefixes (q, k, v). Everything else is a module prefix.
    """

    norm1: str
    qkv: str | tuple[str, str, str]
    out: str
    norm2: str
    fc1: str
    fc2: str


def block_rules(ours: str, theirs: str, names: BlockNames) -> list[Rule]:
    """The rules of one transformer block: our `{ours}.norm1/attn.qkv/attn.out/norm2/mlp.fc1/mlp.fc2`."""
    rules = module(f"{ours}.norm1", f"{theirs}.{names.norm1}") + module(f"{ours}.norm2", f"{theirs}.{names.norm2}")
    for param in ("weight", "bias"):
        if isinstance(names.qkv, str):  # one fused in_proj tensor, already in our [q; k; v] layout
            rules.append(rename(f"{ours}.attn.qkv.{param}", f"{theirs}.{names.qkv}{param}"))
        else:
            rules.append(fused(f"{ours}.attn.qkv.{param}", tuple(f"{theirs}.{part}.{param}" for part in names.qkv)))
    rules += module(f"{ours}.attn.out", f"{theirs}.{names.out}")
    rules += module(f"{ours}.mlp.fc1", f"{theirs}.{names.fc1}") + module(f"{ours}.mlp.fc2", f"{theirs}.{names.fc2}")
    return rules


@dataclass
class Format:
    """A named checkpoint format: its rules plus the foreign keys it knowingly does not load.

    `skip` maps a foreign key to the reason it is not loaded; every such key is checked by
    `check_skipped` (e.g. a `position_ids` buffer must be the plain arange it always is), so
    nothing is dropped without being looked at.
    """

    name: str
    rules: list[Rule]
    skip: Callable[[str], str | None] = lambda key: None
    check_skipped: Callable[[str, torch.Tensor], None] = lambda key, tensor: None
    notes: list[str] = field(default_factory=list)


def to_ours(
    state: Mapping[str, torch.Tensor], fmt: Format, expected: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Convert a foreign state dict into vlmkit names, strictly.

    Fails with one `UserError` that names the source, the assumed format and the foreign keys that
    are missing, unexpected, or of the wrong shape for the model (`expected` is the target model's
    state dict, typically on the meta device). Tensors that need no change are passed through
    without a copy.
    """
    wanted = {key for rule in fmt.rules for key in rule.theirs}
    missing = sorted(key for key in wanted if key not in state)
    unexpected = []
    for key in sorted(set(state) - wanted):
        if fmt.skip(key) is None:
            unexpected.append(key)
        else:
            fmt.check_skipped(key, state[key])
    converted, mismatched = {}, []
    for rule in fmt.rules:
        if any(key not in state for key in rule.theirs):
            continue  # already reported as missing
        parts = [state[key] for key in rule.theirs]
        target = expected.get(rule.ours)
        try:
            tensor = rule.join(*parts)
        except RuntimeError:  # e.g. q, k and v of different widths cannot be fused
            tensor = None
        if target is None or tensor is None or tuple(tensor.shape) != tuple(target.shape):
            shapes = ", ".join(f"{key} {tuple(part.shape)}" for key, part in zip(rule.theirs, parts))
            wanted_shape = "no such tensor" if target is None else tuple(target.shape)
            mismatched.append(f"{shapes} (model expects {wanted_shape})")
            continue
        converted[rule.ours] = tensor
    if missing or unexpected or mismatched:
        raise key_mismatch_error(source, fmt.name, missing, unexpected, mismatched,
                                 hint="; check that the file is this format, or give the architecture explicitly")
    return converted


def to_theirs(state: Mapping[str, torch.Tensor], fmt: Format) -> dict[str, torch.Tensor]:
    """Convert a vlmkit state dict into the foreign names (export); every vlmkit tensor must be covered."""
    uncovered = sorted(set(state) - {rule.ours for rule in fmt.rules})
    if uncovered:
        raise UserError(
            f"this model has tensors the {fmt.name} format has no place for: {name_listing(uncovered)}; "
            f"save it in vlmkit's format instead"
        )
    out: dict[str, torch.Tensor] = {}
    for rule in fmt.rules:
        for key, tensor in zip(rule.theirs, rule.split(state[rule.ours].detach())):
            out[key] = tensor.contiguous()
    return out


def check_position_ids(key: str, tensor: torch.Tensor) -> None:
    """Old HF checkpoints store `position_ids`, a constant arange buffer; accept it only if it is one."""
    flat = tensor.reshape(-1)
    if not torch.equal(flat.long(), torch.arange(flat.numel())):
        raise UserError(
            f"checkpoint key {key} is not the plain 0..N-1 position index that vlmkit assumes; "
            f"custom position ids are not supported"
        )


def count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered sub-modules `{prefix}{i}.` in a state dict (transformer depth, ResNet blocks)."""
    indices = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
    return len({index for index in indices if index.isdigit()})
