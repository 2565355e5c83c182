"""Typed configuration: nested dataclasses read strictly from dicts.

Every family's config is a dataclass. `from_dict` rejects unknown keys loudly (a typo in a
recipe must never be ignored) and builds nested dataclasses; `to_dict` is its inverse and is
what `config.json` holds.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from vlmkit.errors import UserError

T = TypeVar("T")


def _resolve_type(annotation):
    """Return the dataclass type hidden in an annotation such as `VisionConfig | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
        return None
    return annotation if dataclasses.is_dataclass(annotation) else None


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {where}; "
            f"valid keys are: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in data.items():
        nested = _resolve_type(hints[name])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, where=f"{where}.{name}")
        elif isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        values[name] = value
    return cls(**values)


def to_dict(config) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (JSON-ready)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with dotted keys (`model.vision.depth=2`) set to new values."""
    import copy

    result = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"cannot set '{dotted}': '{part}' is not a section")
        node[parts[-1]] = value
    return result
