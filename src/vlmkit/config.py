"""Typed configuration: nested dataclasses read strictly from dicts.

Every family's config is a dataclass. `from_dict` rejects unknown keys loudly (a typo in a
recipe must never be ignored) and builds nested dataclasses; `to_dict` is its inverse and is
what `config.json` holds.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from vlmkit.errors import UserError

T = TypeVar("T")


_NONE = type(None)


def _union_args(annotation) -> tuple | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return None


def _resolve_type(annotation):
    """Return the dataclass type hidden in an annotation such as `VisionConfig | None`."""
    args = _union_args(annotation)
    if args is not None:
        for arg in args:
            if dataclasses.is_dataclass(arg):
                return arg
        return None
    return annotation if dataclasses.is_dataclass(annotation) else None


def _plural(annotation) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}.get(annotation, "values")


def _type_name(annotation) -> str:
    args = _union_args(annotation)
    if args is not None:
        return " or ".join("null" if arg is _NONE else _type_name(arg) for arg in args)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(annotation))
    if origin is tuple:
        items = typing.get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return f"a list of {_plural(items[0])}"
        if items:
            return f"a list of {len(items)} {_plural(items[0])}" if len(set(items)) == 1 else "a list"
        return "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    if dataclasses.is_dataclass(annotation):
        return f"a mapping of {annotation.__name__} keys"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


class _Mismatch(Exception):
    """A value that does not fit its annotation; the argument, if any, says what was expected instead."""


def _number(value, kind: type):
    """`value` as an int or a float; a string holding one is read (never a bool: True is not 1 here)."""
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            raise _Mismatch from None
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise _Mismatch
        value = int(value)
    if not isinstance(value, (int, float)):
        raise _Mismatch
    if kind is float and not math.isfinite(value):
        # inf and nan pass every range check (`inf > 0`, `nan < 1` is False) and break a run later
        raise _Mismatch("a finite number")
    return kind(value)


def _coerce(value, annotation):
    """`value` as `annotation` asks, or _Mismatch. Numbers written as strings are read as numbers
    (YAML 1.1 reads `1e-3` as a string); nothing else is converted."""
    if annotation is Any or annotation is typing.Any:
        return value
    args = _union_args(annotation)
    if args is not None:
        if value is None and _NONE in args:
            return None
        reasons = []
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch as mismatch:
                reasons += mismatch.args
        raise _Mismatch(*reasons[:1])
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:  # a choice among fixed values: `precision: Literal["auto", "fp32", "bf16"]`
        if isinstance(value, bool) or value not in typing.get_args(annotation):
            raise _Mismatch
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = typing.get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_coerce(item, items[0]) for item in value)
        if items and len(items) != len(value):
            raise _Mismatch
        return tuple(_coerce(item, kind) for item, kind in zip(value, items)) if items else tuple(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation in (int, float):
        return _number(value, annotation)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(annotation):  # a nested section given as a mapping is built by from_dict
        raise _Mismatch
    return value  # other annotations (callables, classes) are not checked


def bounded(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, **field_options) -> Any:
    """A dataclass field whose numeric value must lie in a range that `check_fields` enforces:
    `steps: int = bounded(1000, low=1)`, `lr: float = bounded(5e-4, low=0, low_open=True)` (above 0).
    A None value (an optional field left unset) is not checked."""
    metadata = {"range": (low, high, low_open, high_open)}
    return dataclasses.field(default=default, metadata=metadata, **field_options)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"above {low:g}" if low_open else f"at least {low:g}"
    return f"below {high:g}" if high_open else f"at most {high:g}"


def check_fields(instance, where: str, separator: str = " ") -> None:
    """Raise a UserError naming the first field of dataclass `instance` outside its `bounded` range or
    its `Literal[...]` choices (called from `__post_init__`, so a dataclass built in code is checked as
    one read from a file is). Messages read `{where}{separator}{field} must be ...`."""
    hints = typing.get_type_hints(type(instance))
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        if typing.get_origin(hints[item.name]) is typing.Literal and value not in typing.get_args(hints[item.name]):
            raise UserError(f"{where}{separator}{item.name} must be {_type_name(hints[item.name])}, got {value!r}")
        if "range" not in item.metadata or value is None:
            continue
        low, high, low_open, high_open = item.metadata["range"]
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or value != value:  # value != value: NaN fails every range
            raise UserError(f"{where}{separator}{item.name} must be {_range_text(low, high, low_open, high_open)}, got {value}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses.

    Unknown keys, keys that do not apply (a class may define `applicable_keys(data) -> (keys,
    description)`, e.g. a ResNet tower has no `patch_size`) and values of the wrong type are UserErrors naming the key.
    """
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
    applicable = getattr(cls, "applicable_keys", None)
    if applicable is not None:
        allowed, what = applicable(data)
        wrong = sorted(set(data) - allowed)
        if wrong:
            raise UserError(f"{', '.join(repr(k) for k in wrong)} in {where} do(es) not apply to {what}; remove it")
    values = {}
    for name, value in data.items():
        nested = _resolve_type(hints[name])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, where=f"{where}.{name}")
        else:  # a section given as a list, a number or null where it is required fails here, named
            try:
                value = _coerce(value, hints[name])
            except _Mismatch as mismatch:
                expected = mismatch.args[0] if mismatch.args else _type_name(hints[name])
                raise UserError(f"{where}.{name} must be {expected}, got {value!r}") from None
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:  # a __post_init__ check that is not a UserError yet
        raise UserError(f"{where}: {error}") from None


def to_dict(config) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (JSON-ready), keeping only the keys that apply."""
    result = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        result[field.name] = value
    applicable = getattr(type(config), "applicable_keys", None)
    if applicable is not None:
        allowed, _ = applicable(result)
        result = {key: value for key, value in result.items() if key in allowed}
    return result


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
