"""The registry of model families and of named configurations (timm-style).

Families are discovered, not listed: every module in `vlmkit.models` (other than this one and
`base`) is imported once, and importing a family module registers it (`@register_family`) and
its named configurations (`register_config`). Packages outside vlmkit can add families through
the `vlmkit.families` entry-point group (each entry point names a module to import).

Tests are parametrized over `list_models(tiny=True)` and the families' capabilities, so a new
family is tested for free. Lookups never return None: an unknown name is an error that lists
the known ones.
"""
from __future__ import annotations

import copy
import importlib
import pkgutil
from typing import Any

from vlmkit.errors import UserError

_NOT_FAMILIES = {"base", "registry"}
_FAMILIES: dict[str, type] = {}
_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {}
_TINY: set[str] = set()
_loaded = False


def register_family(cls):
    """Class decorator: make `cls` (a VLModel subclass) loadable by its `family` name."""
    if cls.family in _FAMILIES and _FAMILIES[cls.family] is not cls:
        raise TypeError(f"two classes register the model family '{cls.family}': {_FAMILIES[cls.family].__name__} and {cls.__name__}")
    _FAMILIES[cls.family] = cls
    return cls


def register_config(name: str, family: str, config: dict[str, Any], tiny: bool = False) -> None:
    """Name a configuration of `family`. `tiny=True`: small enough for the registry-wide CPU tests;
    every family registers at least one."""
    if name in _CONFIGS:
        raise TypeError(f"model configuration '{name}' is registered twice")
    _CONFIGS[name] = (family, config)
    if tiny:
        _TINY.add(name)


def family_modules() -> list[str]:
    """The modules that define families: every module of vlmkit.models plus the entry points."""
    import vlmkit.models as package

    names = [f"vlmkit.models.{info.name}" for info in pkgutil.iter_modules(package.__path__)
             if info.name not in _NOT_FAMILIES and not info.name.startswith("_")]
    try:
        from importlib.metadata import entry_points

        names += [entry.value for entry in entry_points(group="vlmkit.families")]
    except Exception:  # a broken third-party distribution must not stop vlmkit's own families
        pass
    return names


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    for module in family_modules():
        importlib.import_module(module)
    _loaded = True


def get_family(name: str):
    _load_families()
    if name not in _FAMILIES:
        raise UserError(f"unknown model family '{name}'; known families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def list_families() -> list[str]:
    _load_families()
    return sorted(_FAMILIES)


def named_config(name: str) -> tuple[str, dict[str, Any]]:
    _load_families()
    if name not in _CONFIGS:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(sorted(_CONFIGS))}")
    family, config = _CONFIGS[name]
    return family, copy.deepcopy(config)


def list_models(tiny: bool | None = None) -> list[str]:
    """Registered configuration names; `tiny=True` only the CPU-test-sized ones, `False` the others."""
    _load_families()
    return sorted(name for name in _CONFIGS if tiny is None or (name in _TINY) == tiny)


def build_model(family: str, config: dict[str, Any]):
    """A randomly initialised model of `family` from a (nested) config dict."""
    return get_family(family).from_config_dict(config)


def create_model(name: str, **overrides):
    """A registered configuration by name, with dotted-key overrides (`text.depth=2`)."""
    from vlmkit.config import apply_overrides

    family, config = named_config(name)
    return build_model(family, apply_overrides(config, overrides))
