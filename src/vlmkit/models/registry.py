"""The registry of model families and of named configurations (timm-style).

`register_family` records a `VLModel` subclass; `register_config` records a named set of
config values for a family ("clip-tiny", "clip-vit-b-32", ...). Tests are parametrized over
`list_models()`, so a new entry is tested for free. Lookups never return None: an unknown
name is an error that lists the known ones.
"""
from __future__ import annotations

import importlib
from typing import Any

from vlmkit.errors import UserError

# One module per family; importing it registers the family and its named configurations.
FAMILY_MODULES = (
    "vlmkit.models.clip",
    "vlmkit.models.text_encoder",
    "vlmkit.models.virtex",
    "vlmkit.models.simvlm",
    "vlmkit.models.vqa",
)

_FAMILIES: dict[str, type] = {}
_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_family(cls):
    _FAMILIES[cls.family] = cls
    return cls


def register_config(name: str, family: str, config: dict[str, Any]) -> None:
    _CONFIGS[name] = (family, config)


def _load_families() -> None:
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def get_family(name: str):
    _load_families()
    if name not in _FAMILIES:
        raise UserError(f"unknown model family '{name}'; known families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def named_config(name: str) -> tuple[str, dict[str, Any]]:
    _load_families()
    if name not in _CONFIGS:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(sorted(_CONFIGS))}")
    family, config = _CONFIGS[name]
    import copy

    return family, copy.deepcopy(config)


def list_models() -> list[str]:
    _load_families()
    return sorted(_CONFIGS)


def build_model(family: str, config: dict[str, Any]):
    """A randomly initialised model of `family` from a (nested) config dict."""
    return get_family(family).from_config_dict(config)


def create_model(name: str, **overrides):
    """A registered configuration by name, with dotted-key overrides (`text.depth=2`)."""
    from vlmkit.config import apply_overrides

    family, config = named_config(name)
    return build_model(family, apply_overrides(config, overrides))
