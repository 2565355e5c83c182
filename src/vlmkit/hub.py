"""`vlmkit.load(path)`: find out what a folder or file holds and load it, with no network.

vlmkit run/model folders (config.json with a "family" key) load here; anything else goes to
`vlmkit.interop.load_foreign` (HF CLIP, HF BERT / sentence-transformers, OpenAI/OpenCLIP files).
"""
from __future__ import annotations

from pathlib import Path

from vlmkit.errors import UserError


def load(path, device: str | None = None, **kwargs):
    """Load a model with its tokenizer and image transform attached, in eval mode."""
    source = Path(path)
    if not source.exists():
        raise UserError(
            f"model path {source} does not exist; give a run folder written by 'vlmkit train', an HF CLIP or "
            f"BERT/sentence-transformers folder, or an OpenAI/OpenCLIP weights file"
        )
    model = None
    config_file = source / "config.json" if source.is_dir() else None
    if config_file is not None and config_file.exists():
        from vlmkit.textfiles import decode_text, parse_json

        meta = parse_json(decode_text(config_file.read_bytes(), str(config_file)), str(config_file), "the folder is damaged")
        if isinstance(meta, dict) and "family" in meta:
            from vlmkit.models.registry import get_family

            if not (source / "model.safetensors").exists():
                raise UserError(f"{source} has a config.json but no model.safetensors; the run has not saved weights yet")
            if any(value is not None for value in kwargs.values()):
                raise UserError(f"load options {', '.join(sorted(kwargs))} apply to foreign checkpoints, not to the vlmkit folder {source}")
            model = get_family(meta["family"]).from_pretrained(source)
    if model is None:
        model = _load_foreign(source, **kwargs)
    if device:
        model.to(device)
    return model


def _load_foreign(source: Path, **kwargs):
    try:
        from vlmkit.interop import load_foreign
    except ImportError:
        load_foreign = None
    if load_foreign is None:
        raise UserError(f"{source} is not a vlmkit model folder (no config.json with a 'family' key)")
    return load_foreign(source, **kwargs)
