"""Where each area's CLI verbs are gathered (see cli.py)."""
from __future__ import annotations


def register_all(subparsers) -> None:
    """Add every verb; each module owns the parsers and handlers of its own verbs."""
    import importlib

    for module_name in (
        "vlmkit.data.cli",      # vlmkit data synth
        "vlmkit.train.cli",     # vlmkit train
        "vlmkit.tasks.generative_cli",  # vlmkit caption, ask (+ eval caption|vqa|reasoning)
        "vlmkit.tasks.cli",     # vlmkit eval ..., classify, embed
        "vlmkit.interop.cli",   # vlmkit convert
        "vlmkit.metrics.cli",   # vlmkit score captions|vqa
        "vlmkit.demo",          # vlmkit demo
    ):
        importlib.import_module(module_name).register(subparsers)
