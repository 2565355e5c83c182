"""vlmkit: vision-language models in PyTorch.

The public API is small:
  vlmkit.load(path)            a trained run folder (or, later, a public checkpoint) -> model
  vlmkit.create_model(name)    a registered configuration, randomly initialised
  vlmkit.list_models()         the registered configuration names
"""
from vlmkit.errors import UserError

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a model from `path` with its tokenizer and image transform attached (no network)."""
    from vlmkit.hub import load as _load

    return _load(path, **kwargs)


def create_model(name: str, **overrides):
    """Build a registered model configuration by name, randomly initialised."""
    from vlmkit.models.registry import create_model as _create

    return _create(name, **overrides)


def list_models(tiny: bool | None = None) -> list[str]:
    """Names of the registered model configurations (`tiny=True`: only the CPU-test-sized ones)."""
    from vlmkit.models.registry import list_models as _list

    return _list(tiny)


__all__ = ["load", "create_model", "list_models", "UserError", "__version__"]
